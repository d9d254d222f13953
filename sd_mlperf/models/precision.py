"""Compute precision of the models: the autocast context for `fp32`, `fp16` or `bf16`.

The model parameters stay fp32 (unless parallel.half_weights casts them, keeping fp32 masters in the
optimizer) and autocast runs the matmuls/convs in fp16 or bf16 (training, evaluation and benchmarks alike).
fp16 on the CPU: torch's CPU autocast supports float16 (slowly), so `training.precision=fp16` runs on a CPU
too; the tests use that to exercise the loss-scaled path. It is meant for tests, not for speed, and logs a
warning once.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from sd_mlperf.utils.logging import log_once

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` (fp32: a null context) on `device`'s type."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"invalid value for 'training.precision': {precision!r}; allowed: fp32, fp16, bf16.")
    if precision == "fp16" and device.type == "cpu":
        log_once("fp16-cpu", "training.precision=fp16 on the CPU uses torch's CPU fp16 autocast: correct but slow; "
                 "set training.precision=fp32 (or bf16) for CPU runs.", logging.WARNING)
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
