"""AdamW hyperparameters and the learning-rate schedule, shared by both data-parallel backends.

The schedule is the reference's `ldm.lr_scheduler.LambdaLinearScheduler` with warm_up_steps
[1000], f_start [1e-6], f_max = f_min = [1] under torch's LambdaLR: the lr of optimizer step n
(0-based, the n-th update) is

    lr(n) = peak * (f_start + (1 - f_start) * n / warmup_steps)   for n < warmup_steps
    lr(n) = peak                                                  for n >= warmup_steps

so step 0 runs at f_start x peak and step `warmup_steps` is the first one at the peak.

Also which AdamW kernel runs: fused (one launch for all tensors) and, under a CUDA graph, capturable.
"""

from __future__ import annotations

from typing import Any

import torch

from sd_mlperf.config.load import peak_learning_rate
from sd_mlperf.config.schema import OptimConfig


class LRSchedule:
    """Linear warmup from warmup_start_factor x peak to peak over warmup_steps, then constant."""

    def __init__(self, optim: OptimConfig, global_batch_size: int) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}; "
                             "check training.micro_batch_size and parallel.*")
        self.peak_lr = peak_learning_rate(optim, global_batch_size)
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


def adamw_kernel_options(device: torch.device, *, capturable: bool = False) -> dict[str, Any]:
    """Keyword arguments for torch.optim.AdamW: fused kernels everywhere, capturable under a CUDA graph.

    `fused=True` also makes GradScaler hand `grad_scale`/`found_inf` to the kernel as tensors,
    so an fp16 step with dynamic loss scaling has no host sync (needed inside a CUDA graph).
    `capturable=True` keeps the step counter on the device; eager steps pay for it, so it is set
    only when the step will be captured.
    """
    options: dict[str, Any] = {"fused": True}
    if capturable and device.type == "cuda":
        options["capturable"] = True
    return options


def _step_counter(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Any:
    """Adam's `step` for `p`, or None (no state yet, or None: ZeRO's entry for another rank's parameter)."""
    return (optimizer.state.get(p) or {}).get("step")


def place_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Put fused/capturable AdamW step counters back on their parameter's device, as float32.

    torch's ZeroRedundancyOptimizer.load_state_dict writes the local AdamW state itself and moves
    every 0-d tensor (Adam's `step`) to the CPU; fused AdamW on CUDA then fails on its first step
    (state_steps on another device) and a capturable one cannot be captured. A plain
    Optimizer.load_state_dict already places them like this.
    """
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            step = _step_counter(optimizer, p)
            if torch.is_tensor(step) and (step.device != p.device or step.dtype != torch.float32):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def make_capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Mark every param group capturable, so `step()` may run inside a CUDA graph capture; returns it.

    Only for fused AdamW/Adam, whose step counters already live on the parameters' device; an
    optimizer whose existing state holds CPU step counters cannot be captured. A
    ZeroRedundancyOptimizer is marked together with its local AdamW (`.optim`): ZeRO copies its own
    param_groups' settings onto the local one at every step, which would undo a local-only mark.
    """
    local = getattr(optimizer, "optim", None)
    for opt in (optimizer, local) if isinstance(local, torch.optim.Optimizer) else (optimizer,):
        for group in opt.param_groups:
            if not group.get("fused"):
                raise ValueError("CUDA graph capture of the optimizer step needs fused AdamW (fused=True); build it "
                                 "with parallel.optimizer.adamw_kernel_options() or set training.cuda_graph=false")
            for p in group["params"]:
                step = _step_counter(opt, p)
                assert step is None or step.device == p.device, "fused AdamW keeps its step on the parameter's device"
            group["capturable"] = True
        # The warmup before capture steps uncaptured on purpose; torch would warn about that once.
        opt._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]
    return optimizer
