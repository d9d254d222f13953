"""The megatron-core data-parallel backend: mcore DistributedDataParallel + distributed optimizer (GPU).

Wiring follows megatron's `examples/run_simple_mcore_train_loop.py`: a process group, then
`parallel_state.initialize_model_parallel()` (tensor/pipeline size 1: pure data parallelism), then
`DistributedDataParallel(config=TransformerConfig(minimal), ddp_config=..., module=unet)` and
`get_megatron_optimizer(OptimizerConfig(...), [ddp])`.

Numerics match the torch backend and the reference:
- megatron's optimizer "adam" with `decoupled_weight_decay=True` (its default) is AdamW: TE/apex
  FusedAdam with `adam_w_mode=True`, or torch.optim.AdamW when neither is installed (see
  `megatron/core/optimizer/__init__.py`, `_get_megatron_optimizer_based_on_param_groups`).
- `config_overrides={}`: weight decay on every parameter. megatron's default skips biases and 1-d
  parameters (wd_mult 0); the reference's torch AdamW decays them all.
- fp16: DynamicGradScaler(initial_loss_scale, min_loss_scale, growth 2, backoff 0.5,
  loss_scale_window) with hysteresis 1, i.e. the torch GradScaler rule. bf16/fp32: a constant
  scale of 1, so inf/NaN gradients are still detected and the step skipped.
- clip_grad = 0 (no clipping) unless optim.grad_clip_norm is set (megatron's default is 1.0).
- The UNet's parameters stay fp32 (the master weights); autocast does the fp16/bf16 math.
megatron's step() reads found_inf and the grad norm on the host (one sync per step, in megatron).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from sd_mlperf.backends import Resolution
from sd_mlperf.config.load import learning_rate
from sd_mlperf.config.schema import Config
from sd_mlperf.parallel.data_parallel import DataParallelModel
from sd_mlperf.parallel.distributed import DistInfo

BACKEND = "mcore"


def _import_mcore() -> Any:
    # megatron warns at import time when TE/apex are missing (CPU test machines); it then uses torch optimizers.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        try:
            import megatron.core.distributed as mdist
            import megatron.core.optimizer as mopt
            from megatron.core import parallel_state
            from megatron.core.transformer import TransformerConfig
        except ImportError as exc:
            raise RuntimeError(f"parallel.backend=mcore needs megatron-core ({exc}); pip install 'sd_mlperf[gpu]' "
                               "or set parallel.backend=torch.") from exc
    return mdist, mopt, parallel_state, TransformerConfig


def _ensure_process_group(dist: DistInfo) -> None:
    """megatron needs a process group even for one process; make a private single-rank one."""
    if torch.distributed.is_initialized():
        return
    assert dist.world_size == 1, "init_distributed creates the group when world_size > 1"
    torch.distributed.init_process_group("nccl" if dist.device.type == "cuda" else "gloo",
                                         store=torch.distributed.HashStore(), rank=0, world_size=1)


class McoreDataParallel(DataParallelModel):
    """megatron-core DDP (bucketed, overlapped reduce-scatter) + DistributedOptimizer(AdamW)."""

    def __init__(self, model: nn.Module, cfg: Config, dist: DistInfo, resolution: Resolution) -> None:
        super().__init__(cfg, dist)
        mdist, mopt, parallel_state, TransformerConfig = _import_mcore()
        _ensure_process_group(dist)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
        self.unwrapped = model
        self.resolution = resolution
        self.distributed_optimizer = cfg.parallel.distributed_optimizer
        # DDP only reads generic fields of the TransformerConfig; the UNet is not a megatron transformer.
        transformer_config = TransformerConfig(num_layers=1, hidden_size=1, num_attention_heads=1,
                                               params_dtype=torch.float32)
        ddp_config = mdist.DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            bucket_size=cfg.parallel.bucket_size,
        )
        self.module = mdist.DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=model)
        self.module.broadcast_params()  # ranks may have built the model with different seeds
        precision = cfg.training.precision
        optimizer_config = mopt.OptimizerConfig(
            optimizer="adam",  # AdamW: decoupled_weight_decay=True (see the module docstring)
            decoupled_weight_decay=True,
            lr=learning_rate(cfg),
            weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.beta1,
            adam_beta2=cfg.optim.beta2,
            adam_eps=cfg.optim.eps,
            fp16=precision == "fp16",
            bf16=precision == "bf16",
            params_dtype=torch.float32,
            loss_scale=None if precision == "fp16" else 1.0,  # None + fp16 = dynamic scaling
            initial_loss_scale=cfg.training.initial_loss_scale,
            min_loss_scale=cfg.training.min_loss_scale,
            loss_scale_window=cfg.training.loss_scale_window,
            hysteresis=1,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            clip_grad=cfg.optim.grad_clip_norm or 0.0,
        )
        self.optimizer = mopt.get_megatron_optimizer(optimizer_config, [self.module], config_overrides={})
        self._num_skipped = 0

    def zero_grad(self) -> None:
        """Zero megatron's contiguous grad buffers (and any .grad)."""
        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of loss x loss scale / grad_accumulation_steps; bucket reductions start during it."""
        loss = self.optimizer.scale_loss(loss)
        if self.grad_accumulation_steps > 1:
            loss = loss / self.grad_accumulation_steps
        loss.backward()

    def finish_grad_sync(self) -> None:
        """Wait for the overlapped reduce-scatter (or all-reduce) of every bucket."""
        self.module.finish_grad_sync()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """megatron DDP's no_sync (gradients accumulate in the buffers)."""
        return self.module.no_sync()

    def step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """megatron's step at `lr`: unscale, inf check (skips and backs off), optional clip, AdamW, param gather."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ok, grad_norm, _ = self.optimizer.step()  # host values: megatron syncs inside
        if not ok:
            self._num_skipped += 1
        device = self.dist.device
        norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm), device=device)
        return torch.tensor(bool(ok), device=device), norm

    @property
    def loss_scale(self) -> torch.Tensor:
        """megatron's current loss scale ((1,) tensor)."""
        return self.optimizer.get_loss_scale()

    @property
    def num_skipped_steps(self) -> int:
        """Steps skipped on inf/NaN gradients (a host counter: megatron already synced)."""
        return self._num_skipped

    def _inner(self) -> list[Any]:
        return list(self.optimizer.chained_optimizers)

    def state_dict(self) -> dict[str, Any]:
        """megatron's common state (param groups, grad scaler) + param/Adam shards gathered on DP rank 0."""
        state: dict[str, Any] = {"backend": BACKEND, "world_size": self.dist.world_size,
                                 "distributed_optimizer": self.distributed_optimizer,
                                 "optimizer": self.optimizer.state_dict(), "num_skipped": self._num_skipped}
        if self.distributed_optimizer:
            # Collective over the data-parallel gloo group; None on ranks other than 0.
            state["param_state"] = [opt.get_parameter_state_dp_zero() for opt in self._inner()]
        return state

    def load_state_dict(self, state: dict[str, Any], *, reshard: bool = False) -> None:
        """Load rank 0's state_dict() on every rank; DP rank 0 scatters the shards (same world size only)."""
        self._check_state(state, BACKEND, reshard=reshard)
        if bool(state.get("distributed_optimizer")) != self.distributed_optimizer:
            raise ValueError("the optimizer state was saved with another parallel.distributed_optimizer setting; "
                             "resume with the same value.")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.distributed_optimizer:
            if self.dist.rank == 0 and state["param_state"][0] is None:
                raise ValueError("this optimizer state came from a rank other than 0; load the state rank 0 saved.")
            for opt, param_state in zip(self._inner(), state["param_state"]):
                # no_grad: fp32 shards are views of the parameters, and megatron copies into them in place.
                with _without_step_entries(opt), torch.no_grad():
                    opt.load_parameter_state_from_dp_zero(param_state if self.dist.rank == 0 else None)
        self._num_skipped = int(state.get("num_skipped", 0))


@contextlib.contextmanager
def _without_step_entries(opt: Any) -> Any:
    """Hide torch-AdamW `step` entries while megatron copies shards, then give each param its own copy.

    Only the torch.optim.AdamW fallback (no TE/apex) keeps a per-param `step`: megatron's
    load_state_dict assigns ONE shared tensor to every param (AdamW would then increment it once
    per param and step), and its shard copy expects exactly param/exp_avg/exp_avg_sq.
    """
    states = list(opt.optimizer.state.values())
    steps = [s.pop("step", None) for s in states]
    try:
        yield
    finally:
        for s, step in zip(states, steps):
            if step is not None:
                s["step"] = step.detach().clone()
