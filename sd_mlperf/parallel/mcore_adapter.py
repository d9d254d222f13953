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
  loss_scale_window) with hysteresis 1, i.e. the torch GradScaler rule.
- Non-finite gradients skip the step in EVERY combination, as on the torch backend. megatron alone
  does not: fp32 without the distributed optimizer gets its FP32Optimizer, which has no grad scaler
  and never checks. So `step()` runs megatron's ChainedOptimizer.step in its parts (prepare_grads:
  unscale + inf check where a scaler exists; grad norm; clip; step_with_ready_grads) and applies
  the update only when the global grad norm is finite. The trainer then stops a bf16/fp32 run
  (train_step.step_metrics: fatal) and an fp16 run counts the skip.
- clip_grad = 0 (no clipping) unless optim.grad_clip_norm is set (megatron's default is 1.0).
- The UNet's parameters stay fp32 (the master weights); autocast does the fp16/bf16 math.
- channels-last conv weights (model.unet.channels_last) stay NHWC: see `_keep_channels_last`.
megatron reads found_inf and the grad norm on the host (one sync per step, in megatron).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sd_mlperf.backends import Resolution
from sd_mlperf.config.load import learning_rate, uses_loss_scaling
from sd_mlperf.config.schema import Config
from sd_mlperf.parallel.data_parallel import DataParallelModel, channels_last_weights
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.errors import UserError

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
            raise UserError(f"parallel.backend=mcore needs megatron-core ({exc}); pip install 'sd_mlperf[gpu]' "
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
        # fp32 parameters are their own master weights: the distributed optimizer's main params are then
        # views of megatron's buffer (not copies), which _keep_channels_last relies on.
        assert all(p.dtype == torch.float32 for p in model.parameters()), "the UNet keeps fp32 parameters"
        nhwc = channels_last_weights(model)  # before DDP: with the distributed optimizer it re-views them
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
            fp16=uses_loss_scaling(precision),
            bf16=precision == "bf16",
            params_dtype=torch.float32,
            loss_scale=None if uses_loss_scaling(precision) else 1.0,  # None + fp16 = dynamic scaling
            initial_loss_scale=cfg.training.initial_loss_scale,
            min_loss_scale=cfg.training.min_loss_scale,
            loss_scale_window=cfg.training.loss_scale_window,
            hysteresis=1,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            clip_grad=cfg.optim.grad_clip_norm or 0.0,
        )
        self.optimizer = mopt.get_megatron_optimizer(optimizer_config, [self.module], config_overrides={})
        # After the optimizer: megatron slices its shards with param.view(-1), which NHWC views refuse.
        self._flat_grads = _keep_channels_last(self.module, nhwc)
        self.num_nhwc_weights = len(nhwc)
        """4-D weights kept channels-last (NHWC) in megatron's buffers; 0 without model.unet.channels_last."""
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
        """megatron's ChainedOptimizer.step with one more gate: no update unless the grad norm is finite.

        prepare_grads copies the reduced grads to the main params, unscales them and, where megatron has
        a grad scaler (fp16, bf16, distributed optimizer), checks for inf/NaN and moves the fp16 scale.
        fp32 without the distributed optimizer has no such check: the finite-norm gate covers it, so an
        inf/NaN gradient never reaches the weights in any combination.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._flat_main_grads():
            found_inf = self.optimizer.prepare_grads()  # host value: megatron syncs inside
        grad_norm = float("nan") if found_inf else float(self.optimizer.get_grad_norm())  # host sync (megatron)
        ok = math.isfinite(grad_norm)
        if ok:
            self._clip(grad_norm)
            ok = bool(self.optimizer.step_with_ready_grads())
        if not ok:
            self._num_skipped += 1
        device = self.dist.device
        return torch.tensor(ok, device=device), torch.tensor(grad_norm, device=device)

    def _clip(self, grad_norm: float) -> None:
        """Scale the main grads by optim.grad_clip_norm / grad_norm when that is below 1 (as megatron's step)."""
        if not self.grad_clip_norm:
            return
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for opt in self._inner():
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=self.grad_clip_norm, total_norm=grad_norm)

    @contextlib.contextmanager
    def _flat_main_grads(self) -> Iterator[None]:
        """Lend megatron's flat-order main_grad views to the optimizer (it slices main_grad.view(-1))."""
        for param, flat, _ in self._flat_grads:
            param.main_grad = flat
        try:
            yield
        finally:
            for param, _, nhwc in self._flat_grads:
                param.main_grad = nhwc

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
                                 "num_nhwc_weights": self.num_nhwc_weights,
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
        saved_nhwc = int(state.get("num_nhwc_weights", 0))
        if self.distributed_optimizer and saved_nhwc != self.num_nhwc_weights:
            # The distributed optimizer's shards are flat buffer ranges, and the buffer order of a conv
            # weight is NHWC or NCHW: loading across layouts would scramble weights and Adam moments.
            raise ValueError(f"the optimizer state holds {saved_nhwc} conv weights in channels-last (NHWC) order and "
                             f"this run {self.num_nhwc_weights}; resume with the model.unet.channels_last value it "
                             f"was saved with ({'true' if saved_nhwc else 'false'}).")
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


def _as_nhwc(flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`flat` (a buffer slice holding a weight in O,kh,kw,I order) as an (O,I,kh,kw) channels-last view."""
    out_ch, in_ch, kh, kw = shape
    return flat.view(out_ch, kh, kw, in_ch).permute(0, 3, 1, 2)


def _keep_channels_last(ddp: Any, nhwc: list[nn.Parameter]) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
    """Re-view megatron's buffer slices of `nhwc` weights (and their main_grad) channels-last, in place.

    megatron's _ParamAndGradBuffer gives every parameter a CONTIGUOUS view of its slice: main_grad
    always, param.data too with the distributed optimizer. A channels-last conv weight would then be
    NCHW, and every conv would transpose it, each pass. Instead, each slice holds the weight in NHWC
    order and param.data / main_grad are channels-last views of the SAME slices, so param element k of
    the flat buffer still pairs with grad element k: the reduce-scatter, the optimizer shards (flat
    ranges, built before this) and the param all-gather are untouched, and AdamW is elementwise, so
    the math does not change (only the buffer order of these weights, which the checkpoint records).
    torch DDP's reducer does the same for its buckets (grad views with the parameter's strides).
    Must run after the optimizer is built (it slices param.view(-1)) and before its first step (the
    Adam moments are still zero, so reordering the weight values reorders nothing else).

    Returns (param, megatron's flat-order main_grad, NHWC main_grad) for the weights whose main_grad the
    distributed optimizer slices with view(-1) at each step (see McoreDataParallel._flat_main_grads).
    """
    if not nhwc:
        return []
    wanted = set(nhwc)
    swaps = []
    for buffer in [*ddp.buffers, *ddp.expert_parallel_buffers]:
        for param, (start, end, _) in buffer.param_index_map.items():
            if param not in wanted:
                continue
            flat_grad = param.main_grad
            assert not flat_grad.any(), "re-view the grad buffer before the first backward"
            param.main_grad = _as_nhwc(buffer.grad_data[start:end], param.shape)
            if buffer.param_data is not None:  # distributed optimizer: param.data is a buffer view too
                values = param.detach().clone()
                param.data = _as_nhwc(buffer.param_data[start:end], param.shape)
                param.data.copy_(values)
                swaps.append((param, flat_grad, param.main_grad))
            wanted.discard(param)
    assert not wanted, "every channels-last weight lives in one of megatron's buffers"
    return swaps
