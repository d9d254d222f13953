"""Data parallelism + optimizer behind one small interface, chosen once at build time.

`apply_data_parallel(model, cfg, dist)` resolves role "parallel" (`parallel.backend`) and returns a
`DataParallelModel`. The trainer then only calls:

    dp.zero_grad()
    with autocast(...): loss = loss_fn(dp(x_t, t, context))
    dp.backward(loss)              # x loss scale (fp16), / grad_accumulation_steps
    dp.finish_grad_sync()          # waits for the overlapped gradient reduction
    ok, grad_norm = dp.step(lr)    # 0-d tensors; a step with inf/NaN gradients is skipped and counted

Checkpoint contract (both backends): `state_dict()` is COLLECTIVE (every rank calls it); the optimizer
state is gathered to rank 0, and only rank 0's dict is complete (other ranks get None in its sharded
entries), so only rank 0 saves it. `load_state_dict(sd)` is called on EVERY rank with that same dict
(each rank reads the one file); each rank keeps its own shard. Resume needs the same backend and the
same world size, and is then bit-exact on the CPU. Model weights are not included: save
`dp.unwrapped.state_dict()` (plain ldm names) beside it, and load them BEFORE `load_state_dict`.
With mcore those weight tensors are views into megatron's contiguous parameter buffer: clone them
before writing safetensors (which refuses tensors that share storage).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sd_mlperf.backends import Resolution, config_unsuitable, resolve_backend
from sd_mlperf.config.load import learning_rate, world_size
from sd_mlperf.config.schema import Config
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger


class DataParallelModel(ABC):
    """A model wrapped for data parallelism together with its optimizer and loss scaler."""

    module: nn.Module
    """What to call for the forward pass (a DDP wrapper, or the model itself on one process)."""
    unwrapped: nn.Module
    """The plain UNet: state dicts (ldm names) and evaluation."""
    resolution: Resolution
    """Which `parallel.backend` ran, and why."""
    supports_reshard: bool = False
    """Whether rank 0's state_dict() loads on another world size (checkpoint.allow_reshard)."""

    def __init__(self, cfg: Config, dist: DistInfo) -> None:
        self.dist = dist
        self.precision = cfg.training.precision
        self.grad_accumulation_steps = cfg.training.grad_accumulation_steps
        self.grad_clip_norm = cfg.optim.grad_clip_norm

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the wrapped model."""
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> DataParallelModel:
        """Set train/eval mode on the wrapped model."""
        self.module.train(mode)
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trained parameters (those of the unwrapped model)."""
        return self.unwrapped.parameters()

    @abstractmethod
    def zero_grad(self) -> None:
        """Clear gradients before the first micro-batch of a step."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of loss x loss scale / grad_accumulation_steps (pass each micro-batch's mean loss)."""

    @abstractmethod
    def finish_grad_sync(self) -> None:
        """Wait for (or run) the gradient reduction across data-parallel ranks."""

    @abstractmethod
    def step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, check, (clip,) update at `lr`; return (ok: 0-d bool, grad_norm: 0-d float) tensors."""

    @property
    @abstractmethod
    def loss_scale(self) -> torch.Tensor:
        """The current loss scale (1 unless fp16)."""

    @property
    @abstractmethod
    def num_skipped_steps(self) -> torch.Tensor | int:
        """Steps skipped on inf/NaN gradients so far (a tensor read syncs: only at log time)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimizer + loss-scaler state; collective, complete on rank 0 (see the module docstring)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], *, reshard: bool = False) -> None:
        """Restore rank 0's state_dict() on every rank; `reshard`: it may come from another world size."""

    @abstractmethod
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backend context that skips the gradient reduction (non-last micro-batches)."""

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Wrap forward+backward of every micro-batch but the last of a step (grad accumulation)."""
        with self.no_sync():
            yield

    def _check_state(self, state: dict[str, Any], backend: str, *, reshard: bool = False) -> None:
        if state.get("backend") != backend:
            raise ValueError(f"the optimizer state was saved with parallel.backend={state.get('backend')!r}; "
                             f"this run uses {backend!r}. Resume with the same parallel.backend.")
        if state.get("world_size") != self.dist.world_size:
            if not reshard:
                raise ValueError(f"the optimizer state was saved with {state.get('world_size')} data-parallel ranks; "
                                 f"this run has {self.dist.world_size}. Resume with the same parallel.num_nodes x "
                                 "parallel.gpus_per_node (or start from the weights-only export).")
            if not self.supports_reshard:
                raise ValueError(self.reshard_refusal(int(state.get("world_size", 1))))

    def reshard_refusal(self, saved_world_size: int) -> str:
        """The error for checkpoint.allow_reshard on a backend that cannot load another world size's state."""
        return (f"checkpoint.allow_reshard: parallel.backend={self.resolution.name} resumes only on the world size it "
                f"saved ({saved_world_size} ranks; this run has {self.dist.world_size}). Resume with that many ranks, "
                "or train with parallel.backend=torch.")


def channels_last_weights(model: nn.Module) -> list[nn.Parameter]:
    """Trainable 4-D weights stored channels-last that a contiguous layout would change (kernels over 1x1)."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 4 and not p.is_contiguous()
            and p.is_contiguous(memory_format=torch.channels_last)]


def apply_data_parallel(model: nn.Module, cfg: Config, dist: DistInfo) -> DataParallelModel:
    """Move `model` to dist.device, wrap it for data parallelism and build its optimizer (backend per config)."""
    resolution = resolve_backend("parallel", cfg.parallel.backend,
                                 unsuitable=config_unsuitable(cfg)["parallel"])  # auto + CUDA graph: torch
    if resolution.name == "mcore" and dist.device.type != "cuda":
        raise UserError(f"parallel.backend=mcore needs CUDA (megatron-core allocates CUDA buffers) but the "
                           f"device is {dist.device}; set parallel.backend=torch for CPU runs.")
    if cfg.parallel.half_weights and resolution.name != "torch":
        raise ValueError(f"parallel.half_weights=true is implemented by parallel.backend=torch, but parallel.backend "
                         f"resolved to {resolution.name!r}; set parallel.backend=torch or parallel.half_weights=false.")
    if dist.world_size != world_size(cfg):
        raise ValueError(f"{dist.world_size} processes but parallel.num_nodes x parallel.gpus_per_node = "
                         f"{world_size(cfg)}; make them match.")
    model.to(dist.device)
    num_nhwc = len(channels_last_weights(model))
    if resolution.name == "mcore":
        from sd_mlperf.parallel.mcore_adapter import McoreDataParallel

        dp: DataParallelModel = McoreDataParallel(model, cfg, dist, resolution)
    else:
        from sd_mlperf.parallel.torch_adapter import TorchDataParallel

        dp = TorchDataParallel(model, cfg, dist, resolution)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Both backends keep channels-last weights NHWC (mcore: see mcore_adapter._keep_channels_last).
    logger.info("data parallel: %s over %d rank(s), %s params, lr %.4g, precision %s, distributed optimizer %s, "
                "NHWC conv weights %d/%d", resolution.name, dist.world_size, f"{num_params:,}", learning_rate(cfg),
                cfg.training.precision, cfg.parallel.distributed_optimizer and dist.world_size > 1,
                len(channels_last_weights(model)), num_nhwc)
    return dp
