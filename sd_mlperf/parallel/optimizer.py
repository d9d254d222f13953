"""AdamW hyperparameters and the learning-rate schedule, shared by both data-parallel backends.

The schedule is the reference's `ldm.lr_scheduler.LambdaLinearScheduler` with warm_up_steps
[1000], f_start [1e-6], f_max = f_min = [1] under torch's LambdaLR: the lr of optimizer step n
(0-based, the n-th update) is

    lr(n) = peak * (f_start + (1 - f_start) * n / warmup_steps)   for n < warmup_steps
    lr(n) = peak                                                  for n >= warmup_steps

so step 0 runs at f_start x peak and step `warmup_steps` is the first one at the peak.
"""

from __future__ import annotations

from typing import Any

from sd_mlperf.config.schema import OptimConfig


class LRSchedule:
    """Linear warmup from warmup_start_factor x peak to peak over warmup_steps, then constant."""

    def __init__(self, optim: OptimConfig, global_batch_size: int) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}; "
                             "check training.micro_batch_size and parallel.*")
        self.peak_lr = optim.base_lr_per_sample * global_batch_size
        """base_lr_per_sample x global batch (6.4e-5 at GBS 512)."""
        self.warmup_steps = optim.warmup_steps
        self.start_factor = optim.warmup_start_factor

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based); see the module docstring."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step >= self.warmup_steps:
            return self.peak_lr
        factor = self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        return self.peak_lr * factor

    def first_peak_step(self) -> int:
        """The first 0-based step whose lr is the peak."""
        return self.warmup_steps

    def __repr__(self) -> str:
        return (f"LRSchedule(peak_lr={self.peak_lr:.4g}, warmup_steps={self.warmup_steps}, "
                f"start_factor={self.start_factor:g})")


def adamw_kwargs(optim: OptimConfig, lr: float) -> dict[str, Any]:
    """torch.optim.AdamW keyword arguments from the optim section (decoupled weight decay on every parameter)."""
    if optim.name != "adamw":
        raise ValueError(f"invalid value for 'optim.name': {optim.name!r}; only adamw is implemented.")
    # The reference (ldm) applies weight decay to every UNet parameter, biases and norms included.
    return {"lr": lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps, "weight_decay": optim.weight_decay}
