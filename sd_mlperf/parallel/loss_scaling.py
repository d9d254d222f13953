"""The dynamic loss scaler of the torch backend (fp16); autocast itself is `models.precision.autocast`.

The reference trains with fp16 autocast, dynamic loss scaling and fp32 master weights. Here the
model parameters always stay fp32 and autocast runs the matmuls/convs in fp16 or bf16: the fp32
parameters ARE the master weights, so no separate copy exists. The megatron-core backend brings
its own scaler (DynamicGradScaler via OptimizerConfig) with the same constants.
"""

from __future__ import annotations

from typing import Any

import torch

from sd_mlperf.config.load import uses_loss_scaling
from sd_mlperf.config.schema import TrainingConfig

GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5


class DynamicLossScaler:
    """fp16 dynamic loss scaling without host syncs: halve on overflow, double after `window` clean steps.

    The same rule as torch.amp.GradScaler and megatron-core's DynamicGradScaler with hysteresis 1:
    every overflow halves the scale (never below `min_scale`); `window` consecutive finite steps
    double it. All state lives in tensors on `device`, updated in place, so nothing waits for the
    GPU. With `enabled=False` (fp32, bf16) the scale stays 1 and only the skip counter moves.
    """

    def __init__(self, *, initial_scale: float, min_scale: float, window: int, device: torch.device,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.min_scale = min_scale
        self.window = window
        self.scale = torch.full((1,), initial_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((1,), dtype=torch.int32, device=device)
        self.num_skipped = torch.zeros((1,), dtype=torch.int64, device=device)
        """Steps skipped because a gradient was inf/NaN (read it only at log time: it syncs)."""

    @classmethod
    def from_training(cls, training: TrainingConfig, device: torch.device) -> DynamicLossScaler:
        """Build from the training section (initial_loss_scale, min_loss_scale, loss_scale_window, precision)."""
        return cls(initial_scale=training.initial_loss_scale, min_scale=training.min_loss_scale,
                   window=training.loss_scale_window, device=device, enabled=uses_loss_scaling(training.precision))

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """loss x scale (fp16) or the loss itself."""
        return loss * self.scale.to(loss.dtype) if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Divide `grads` by the scale in place; return found_inf (shape (1,), 1.0 if any is inf/NaN)."""
        found_inf = torch.zeros((1,), dtype=torch.float32, device=self.scale.device)
        if grads:
            inv_scale = self.scale.double().reciprocal().float()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        return found_inf

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor) -> None:
        """Count a skipped step and adapt the scale (fp16) after a step that saw `found_inf`."""
        self.num_skipped += found_inf.to(torch.int64)
        if self.enabled:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, GROWTH_FACTOR, BACKOFF_FACTOR,
                                     self.window)
            self.scale.clamp_(min=self.min_scale)

    def state_dict(self) -> dict[str, Any]:
        """Scale, growth tracker and skip count (CPU tensors)."""
        return {"scale": self.scale.cpu().clone(), "growth_tracker": self.growth_tracker.cpu().clone(),
                "num_skipped": self.num_skipped.cpu().clone(), "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
        if bool(state.get("enabled", self.enabled)) != self.enabled:
            raise ValueError("the checkpoint's loss scaler was saved with another training.precision "
                             f"(fp16 scaling {'on' if state['enabled'] else 'off'}); resume with the same precision.")
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
        self.num_skipped.copy_(state["num_skipped"])
