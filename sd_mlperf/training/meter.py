"""Device-side sums of the per-step metrics between two log lines.

The trainer adds its metric tensors on the device every step (`IntervalMeter.add`, no host sync) and reads
them once per log interval (`IntervalMeter.pop`, the only sync point of the loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class IntervalMeter:
    """Device-side sums of per-step metrics between two log lines.

    `reduce_mean` (built once: identity for one process, an all-reduce mean otherwise) makes every
    rank see the same numbers, so all ranks take the same decision on a non-finite loss.
    """

    def __init__(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.reduce_mean = reduce_mean or (lambda t: t)
        self.reset()

    def reset(self) -> None:
        """Start a new interval."""
        self.sums: torch.Tensor | None = None  # [loss over applied steps, applied steps, fatal steps]
        self.grad_norm: torch.Tensor | None = None
        self.num_steps = 0

    def add(self, loss: torch.Tensor, ok: torch.Tensor, grad_norm: torch.Tensor, fatal: torch.Tensor) -> None:
        """Add one step: the loss counts only when the optimizer applied the step (`ok`)."""
        loss = loss.detach().float()
        applied_loss = torch.where(ok, loss, torch.zeros_like(loss))
        row = torch.stack([applied_loss, ok.float(), fatal.float()])
        self.sums = row if self.sums is None else self.sums + row
        self.grad_norm = grad_norm.detach()
        self.num_steps += 1

    def any_fatal(self) -> bool:
        """Whether any rank saw a step with a non-finite loss that must stop the run (host sync; ranks agree)."""
        if self.sums is None:
            return False
        return bool(self.reduce_mean(self.sums[2:3].clone()).item() > 0)

    def pop(self) -> dict[str, float]:
        """Mean loss over applied steps, skipped count, last grad norm; then reset (host sync)."""
        if self.sums is None:
            return {}
        loss_sum, num_ok, _ = self.reduce_mean(self.sums.clone()).tolist()
        out = {
            "loss": loss_sum / num_ok if num_ok else math.nan,
            "skipped_steps": self.num_steps - round(num_ok),
            "grad_norm": float(self.grad_norm.float().item()),
        }
        self.reset()
        return out
