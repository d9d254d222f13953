"""The plain-PyTorch data-parallel backend: torch DDP + ZeroRedundancyOptimizer(AdamW), gloo-capable.

This is the CPU twin of the megatron-core backend (same sharded-optimizer idea, same numerics):
- world size 1: no wrapper, one fused AdamW.
- world size > 1: torch DDP (all-reduce mean of gradients, overlapped with backward by DDP's own
  buckets) and, with parallel.distributed_optimizer, ZeroRedundancyOptimizer, which gives each rank
  the AdamW state of a subset of parameters and broadcasts updated parameters after the step.
The step never waits for the device: inf/NaN detection, the grad norm, clipping, the conditional
AdamW update (fused AdamW's `found_inf` input) and the loss-scale update are all tensor ops.
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
            raise ValueError("the torch backend keeps fp32 parameters as the master weights; build the model in fp32 "
                             "(training.precision selects the autocast dtype, not the parameter dtype).")
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
        if self.sharded:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer: torch.optim.Optimizer = ZeroRedundancyOptimizer(
                self.params, optimizer_class=torch.optim.AdamW, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(self.params, **kwargs)
        self.scaler = DynamicLossScaler.from_training(cfg.training, dist.device)

    def zero_grad(self) -> None:
        """Drop the gradients (set_to_none; DDP's bucket views are re-created on the next backward)."""
        self.optimizer.zero_grad(set_to_none=True)

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
        """Unscale and check the gradients, clip if configured, AdamW at `lr` unless non-finite.

        `lr` may be a 0-d tensor on the device (fused AdamW reads it there): a CUDA graph then
        replays with whatever value the caller `fill_`s into it, where a float would be frozen.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grads = [p.grad for p in self.params if p.grad is not None]
        found_inf = self.scaler.unscale_(grads)
        if grads:
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        else:
            grad_norm = torch.zeros((), device=self.dist.device)
        if self.grad_clip_norm is not None and grads:
            # Same rule as torch.nn.utils.clip_grad_norm_, without its host sync.
            coef = torch.clamp(self.grad_clip_norm / (grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        # Read by fused AdamW (0-d): skip the update, and undo the step count, if nonzero.
        local = self.local_optimizer
        local.found_inf = found_inf.reshape(())
        local.grad_scale = None  # already unscaled above
        self.optimizer.step()
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
        return {"backend": BACKEND, "world_size": self.dist.world_size, "sharded": self.sharded,
                "optimizer": optimizer_state, "loss_scaler": self.scaler.state_dict()}

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
        self.optimizer.load_state_dict(state["optimizer"])
        place_step_counters(self.local_optimizer)  # ZeRO's load leaves them on the CPU
        self.scaler.load_state_dict(state["loss_scaler"])
