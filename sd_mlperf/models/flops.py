"""Model FLOPs of a training step, counted on the real model, and the peak table for MFU.

`sd-mlperf bench train` and the trainer's progress line (MFU, counted once at build time) use both.

FLOPs are counted with torch.utils.flop_counter (matmuls and convolutions, forward and backward)
on the meta device, so the full SD2 UNet costs no memory and under a second. Model FLOPs are
algorithmic: a fused attention kernel that recomputes in backward does not count twice, which is
the usual MFU convention (the reference's 2.41 TFLOP per trained image is counted the same way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from sd_mlperf.config.schema import UNetConfig

# Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s. Matched in order against the device
# name, so the more specific names come first.
PEAK_DENSE_TFLOPS_16BIT: dict[str, float] = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense 16-bit peak of the named device; None on the CPU, unknown GPUs, or fp32 (MFU n/a)."""
    if precision not in ("fp16", "bf16"):
        return None
    for key, value in PEAK_DENSE_TFLOPS_16BIT.items():
        if key.lower() in device_name.lower():
            return value
    return None


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of the matmuls and convolutions that `fn()` runs (forward and any backward in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flop_config(unet_cfg: UNetConfig) -> UNetConfig:
    """`unet_cfg` with every choice that changes no FLOP (backends, memory format, compile) normalised."""
    return dataclasses.replace(unet_cfg, attention_backend="sdpa", norm_backend="torch", compile=False,
                               channels_last=False, activation_checkpointing=False)


def unet_train_flops(unet_cfg: UNetConfig, *, latent_size: int, context_length: int = 77,
                     batch_size: int = 1) -> int:
    """FLOPs of one UNet forward + backward at this shape (batch `batch_size`), counted on the meta device.

    Every backend computes the same math, so the count uses `sdpa` attention and `torch` norm:
    on the meta device SDPA decomposes into the bmm's the counter knows (a fused CPU/GPU kernel
    would count 0), and the `math` backend's fp32 autocast guard cannot run on meta.
    """
    from sd_mlperf.models.unet import build_unet

    cfg = flop_config(unet_cfg)
    with torch.device("meta"):
        model = build_unet(cfg)
        x = torch.randn(batch_size, cfg.in_channels, latent_size, latent_size)
        t = torch.randint(0, 1000, (batch_size,))
        ctx = torch.randn(batch_size, context_length, cfg.context_dim)

    def step() -> None:
        model(x, t, ctx).float().pow(2).mean().backward()

    return count_flops(step)
