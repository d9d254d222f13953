"""Shared pieces of the parallel tests: a tiny model, configs and a deterministic global batch."""

from __future__ import annotations

import torch
from torch import nn

from sd_mlperf.config.schema import Config
from sd_mlperf.utils.dist_info import DistInfo
from tests.multiprocess_helpers import free_port  # noqa: F401  (re-exported for the tests here)

GLOBAL_BATCH = 8


class TinyNet(nn.Module):
    """Conv + GroupNorm + SiLU + Linear head: the layer kinds of the UNet, a few hundred parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv_in(x)))
        h = self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(h)


def tiny_model(seed: int = 0) -> TinyNet:
    """TinyNet with weights from `seed`."""
    torch.manual_seed(seed)
    return TinyNet()


def make_cfg(*, world_size: int = 1, backend: str = "torch", precision: str = "fp32",
             distributed_optimizer: bool = True, micro_batch_size: int | None = None, warmup_steps: int = 2,
             base_lr_per_sample: float = 1e-3) -> Config:
    """A Config for tests: GBS 8 split over `world_size` ranks; a large lr so that steps move weights."""
    cfg = Config()
    cfg.parallel.backend = backend
    cfg.parallel.gpus_per_node = world_size
    cfg.parallel.distributed_optimizer = distributed_optimizer
    cfg.training.precision = precision
    cfg.training.micro_batch_size = micro_batch_size or GLOBAL_BATCH // world_size
    cfg.optim.warmup_steps = warmup_steps
    cfg.optim.base_lr_per_sample = base_lr_per_sample
    return cfg


def cpu_dist(rank: int = 0, world_size: int = 1) -> DistInfo:
    """DistInfo of a CPU rank."""
    return DistInfo(rank, world_size, rank, torch.device("cpu"), "gloo" if world_size > 1 else "none")


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the whole global batch of `step` (the same on every rank)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 4, 6, 6, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 4, 6, 6, generator=gen)
    return x, y


def shard(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    n = t.shape[0] // world_size
    return t[rank * n:(rank + 1) * n]


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE then batch mean (the training loss's reduction)."""
    return ((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).mean()




def train_step(dp, cfg: Config, step: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the trainer's shape on global_batch(step): (loss, ok, grad norm)."""
    from sd_mlperf.models.precision import autocast

    x, y = global_batch(step)
    dp.zero_grad()
    with autocast(cfg.training.precision, torch.device("cpu")):
        loss = loss_fn(dp(x), y)
    dp.backward(loss)
    dp.finish_grad_sync()
    ok, grad_norm = dp.step(lr)
    return loss.detach(), ok, grad_norm
