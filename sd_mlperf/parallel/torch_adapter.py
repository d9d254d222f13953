"""The plain-PyTorch data-parallel backend: torch DDP + ZeroRedundancyOptimizer(AdamW), gloo-capable.

This is the CPU twin of the megatron-core backend (same sharded-optimizer idea, same numerics):
- world size 1: no wrapper, one fused AdamW.
- world size > 1: torch DDP (all-reduce mean of gradients, overlapped with backward by DDP's own
  buckets) and, with parallel.distributed_optimizer, ZeroRedundancyOptimizer, which gives each rank
  the AdamW state of a subset of parameters and broadcasts updated parameters after the step.
The step never waits for the device: inf/NaN detection, the grad norm, clipping, the conditional
AdamW update (fused AdamW's `found_inf` input) and the loss-scale update are all tensor ops.

Optimizer traffic (HBM bytes per step at 866 M parameters): the gradients are read once for their norm,
which also is the inf/NaN check (a non-finite gradient makes the norm non-finite); unscaling and clipping
are folded into fused AdamW's `grad_scale` (grads / (loss scale / clip coefficient), inside the kernel that
reads them anyway). No separate unscale or clip pass writes the gradients.

parallel.half_weights (NVIDIA's O2): the model's parameters are fp16/bf16 (training.precision), so its
forward reads no fp32 weight and casts none, and its gradients (and DDP's all-reduce) are half too. AdamW
updates fp32 master copies (`master_params`; their gradients are the half gradients cast once), and the
updated masters are cast back into the model's weights. The masters are the state: state_dict saves them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from sd_mlperf.backends import Resolution
from sd_mlperf.config.load import learning_rate
from sd_mlperf.config.schema import Config
from sd_mlperf.parallel.data_parallel import DataParallelModel
from sd_mlperf.parallel.loss_scaling import DynamicLossScaler
from sd_mlperf.parallel.optimizer import adamw_kernel_options, adamw_kwargs, place_step_counters
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.logging import log_once

BACKEND = "torch"


class TorchDataParallel(DataParallelModel):
    """torch DDP (world size > 1) + AdamW or ZeroRedundancyOptimizer(AdamW) + DynamicLossScaler."""

    supports_reshard = True  # rank 0 saves ZeRO's state merged, in plain AdamW's layout

    def __init__(self, model: nn.Module, cfg: Config, dist: DistInfo, resolution: Resolution) -> None:
        super().__init__(cfg, dist)
        self.unwrapped = model
        self.resolution = resolution
        self.params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("the torch backend keeps fp32 parameters as the master weights; build the model in "
                             "fp32 (training.precision selects the autocast dtype; parallel.half_weights=true casts "
                             "the weights itself).")
        self.master_params: list[torch.Tensor] = []
        """parallel.half_weights: the fp32 copies AdamW updates (empty: the fp32 model parameters are the masters)."""
        if cfg.parallel.half_weights:
            self.master_params = _half_weights_with_masters(self.params, cfg.training.precision)
        if dist.world_size > 1:
            # Buffers: the UNet has none, so DDP's per-forward buffer broadcast is a no-op (default kept).
            ddp_kwargs: dict[str, Any] = {"gradient_as_bucket_view": True}
            if cfg.parallel.bucket_size is not None:
                ddp_kwargs["bucket_cap_mb"] = cfg.parallel.bucket_size * 4 / 2**20  # fp32 elements -> MiB
            if dist.device.type == "cuda":
                ddp_kwargs["device_ids"] = [dist.device.index]
            if not cfg.parallel.overlap_grad_reduce:
                log_once("torch-overlap", "parallel.overlap_grad_reduce=false has no effect on parallel.backend=torch: "
                         "torch DDP always overlaps its bucketed all-reduce with backward.")
            # DDP broadcasts rank 0's parameters here, so ranks may build the model with different seeds.
            # A step captured in a CUDA graph needs DDP built on a side stream (PyTorch's CUDA graph notes).
            graphed = cfg.training.cuda_graph and dist.device.type == "cuda"
            with torch.cuda.stream(torch.cuda.Stream()) if graphed else contextlib.nullcontext():
                self.module = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        else:
            self.module = model
        # fused AdamW takes a found_inf tensor and skips the update on device: no host sync on overflow.
        # Capturable (training.cuda_graph) is marked later, by GraphedTrainStep.warm_up (make_capturable).
        kwargs = {**adamw_kwargs(cfg.optim, learning_rate(cfg)), **adamw_kernel_options(dist.device)}
        self.sharded = cfg.parallel.distributed_optimizer and dist.world_size > 1
        stepped = self.master_params or self.params
        if self.sharded:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer: torch.optim.Optimizer = ZeroRedundancyOptimizer(
                stepped, optimizer_class=torch.optim.AdamW, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(stepped, **kwargs)
        self.scaler = DynamicLossScaler.from_training(cfg.training, dist.device)

    def zero_grad(self) -> None:
        """Drop the gradients (set_to_none; DDP's bucket views are re-created on the next backward)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.master_params:  # the optimizer holds the masters; backward writes the model's half gradients
            for p in self.params:
                p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of loss x scale / grad_accumulation_steps; DDP all-reduces during it."""
        loss = self.scaler.scale_loss(loss)
        if self.grad_accumulation_steps > 1:
            loss = loss / self.grad_accumulation_steps
        loss.backward()

    def finish_grad_sync(self) -> None:
        """Nothing to wait for: DDP's backward returns after its all-reduce has finished."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's no_sync (a null context on one process)."""
        if isinstance(self.module, nn.parallel.DistributedDataParallel):
            return self.module.no_sync()
        return contextlib.nullcontext()

    @property
    def local_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW that updates this rank's parameters (ZeRO: the one over this rank's shard)."""
        return self.optimizer.optim if self.sharded else self.optimizer

    @torch.no_grad()
    def step(self, lr: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the gradients (their norm), AdamW at `lr` with unscale and clipping folded in, unless non-finite.

        `lr` may be a 0-d tensor on the device (fused AdamW reads it there): a CUDA graph then
        replays with whatever value the caller `fill_`s into it, where a float would be frozen.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.master_params:  # O2: the masters' gradients are the half gradients, cast once
            for master, p in zip(self.master_params, self.params, strict=True):
                master.grad = None if p.grad is None else p.grad.float()
            grads = [m.grad for m in self.master_params if m.grad is not None]
        scale = self.scaler.scale
        if grads:
            # One read of the (still scaled) gradients: their norm, which is non-finite iff one of them is.
            # Dynamic scaling uses powers of two, which are exact: norm / scale is the unscaled gradients' norm.
            scaled_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            found_inf = (~torch.isfinite(scaled_norm)).float().reshape(1)
            grad_norm = scaled_norm / scale.reshape(()) if self.scaler.enabled else scaled_norm
        else:
            found_inf = torch.zeros((1,), dtype=torch.float32, device=scale.device)
            grad_norm = torch.zeros((), device=self.dist.device)
        # fused AdamW divides each gradient by grad_scale as it reads it: unscale, and clipping's coefficient.
        grad_scale = scale.reshape(()) if self.scaler.enabled else None
        if self.grad_clip_norm is not None and grads:
            # Same rule as torch.nn.utils.clip_grad_norm_, without its host sync.
            coef = torch.clamp(self.grad_clip_norm / (grad_norm + 1e-6), max=1.0)
            grad_scale = coef.reciprocal() if grad_scale is None else grad_scale / coef
        # Read by fused AdamW (0-d): skip the update, and undo the step count, if nonzero.
        local = self.local_optimizer
        local.found_inf = found_inf.reshape(())
        local.grad_scale = grad_scale
        self.optimizer.step()
        if self.master_params:  # the updated masters into the half weights (skipped steps copy the old values)
            torch._foreach_copy_(self.params, self.master_params)
        self.scaler.update(found_inf)
        return (found_inf == 0).reshape(()), grad_norm

    @property
    def loss_scale(self) -> torch.Tensor:
        """Current loss scale as a (1,) tensor on the device."""
        return self.scaler.scale

    @property
    def num_skipped_steps(self) -> torch.Tensor:
        """Skipped-step counter (a (1,) int64 tensor on the device)."""
        return self.scaler.num_skipped

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state (ZeRO shards consolidated on rank 0; None elsewhere) and the loss scaler."""
        if self.sharded:
            self.optimizer.consolidate_state_dict(to=0)  # collective
            optimizer_state = self.optimizer.state_dict() if self.dist.rank == 0 else None
        else:
            optimizer_state = self.optimizer.state_dict()
        if optimizer_state is not None:
            # training.cuda_graph's device lr tensor and capturable flag are how this run steps, not state:
            # save a float and capturable=False, so any run can resume (a graphed one re-marks it after loading).
            for group in optimizer_state["param_groups"]:
                if torch.is_tensor(group["lr"]):
                    group["lr"] = float(group["lr"])  # host sync: checkpoints sync anyway
                group["capturable"] = False
        state = {"backend": BACKEND, "world_size": self.dist.world_size, "sharded": self.sharded,
                 "optimizer": optimizer_state, "loss_scaler": self.scaler.state_dict()}
        if self.master_params:  # the model's weights are their half-precision rounding: the masters are the state
            state["master_params"] = [m.detach().cpu().clone() for m in self.master_params]
        return state

    def load_state_dict(self, state: dict[str, Any], *, reshard: bool = False) -> None:
        """Load rank 0's state_dict(); ZeRO keeps this rank's shard of it.

        Rank 0 saves ZeRO's state consolidated, in plain AdamW's layout, so with `reshard` it loads into
        any world size, sharded or not.
        """
        self._check_state(state, BACKEND, reshard=reshard)
        if state["optimizer"] is None:
            raise ValueError("this optimizer state came from a rank other than 0 (its sharded entries are None); "
                             "load the state that rank 0 saved.")
        if bool(state.get("sharded")) != self.sharded and not reshard:
            raise ValueError("the optimizer state was saved with another parallel.distributed_optimizer setting; "
                             "resume with the same value.")
        if bool(self.master_params) != ("master_params" in state):
            raise ValueError("the optimizer state was saved with another parallel.half_weights setting; resume with "
                             "the same value.")
        self.optimizer.load_state_dict(state["optimizer"])
        place_step_counters(self.local_optimizer)  # ZeRO's load leaves them on the CPU
        self.scaler.load_state_dict(state["loss_scaler"])
        if self.master_params:
            with torch.no_grad():
                torch._foreach_copy_(self.master_params, [m.to(self.dist.device) for m in state["master_params"]])
                torch._foreach_copy_(self.params, self.master_params)


def _half_weights_with_masters(params: list[nn.Parameter], precision: str) -> list[torch.Tensor]:
    """Cast `params` in place to fp16/bf16 (same memory format) and return their fp32 copies (the masters)."""
    from sd_mlperf.models.precision import AUTOCAST_DTYPES as dtypes  # fp16, bf16

    if precision not in dtypes:
        raise ValueError(f"parallel.half_weights=true keeps the weights in training.precision, which is {precision!r}; "
                         "set training.precision=fp16 or bf16, or parallel.half_weights=false.")
    masters = []
    for p in params:
        masters.append(p.detach().clone().requires_grad_(True))  # clone keeps the (channels-last) strides
        p.data = p.data.to(dtypes[precision])
    return masters
