"""Process-wide device settings that the fast path wants, decided once at start-up."""

from __future__ import annotations

import torch

from sd_mlperf.utils.logging import logger


def configure_device(device: torch.device) -> None:
    """cuDNN autotuning on: training shapes are static, so the one-time search pays off every step.

    TF32 stays as PyTorch defaults it: the benchmark trains in fp16, and an fp32 run is the
    numerics reference, which TF32 would blur.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    logger.info("cuda: cudnn.benchmark on (static shapes)")
