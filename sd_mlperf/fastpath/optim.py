"""Which AdamW kernel to use: fused (one launch for all tensors) and, for CUDA graphs, capturable."""

from __future__ import annotations

from typing import Any

import torch


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
                                 "with fastpath.optim.adamw_kernel_options() or set training.cuda_graph=false")
            for p in group["params"]:
                step = _step_counter(opt, p)
                assert step is None or step.device == p.device, "fused AdamW keeps its step on the parameter's device"
            group["capturable"] = True
        # The warmup before capture steps uncaptured on purpose; torch would warn about that once.
        opt._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]
    return optimizer
