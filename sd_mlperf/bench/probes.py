"""`sd-mlperf bench attention` and `sd-mlperf bench groupnorm`: every kernel choice on every UNet shape.

The shapes come from the configured UNet itself: one forward on the meta device at the configured batch and
latent size, with hooks on each core attention (q, k, v) and each GroupNorm (input, groups, fused SiLU), counted
per distinct shape. Each (shape, kernel) row times forward and forward + backward (median of `steps` after
`warmup` calls; CUDA events on a GPU), so the choice of SDPA backend and of GroupNorm kernel rests on numbers:

- attention: SDPA restricted to one backend at a time (cudnn, flash, efficient, math), and TE where installed.
- groupnorm: torch eager, torch compiled (inductor, one compile per shape), apex where installed (through
  our opaque custom op when apex's release has none).

A kernel that is missing (BackendUnavailable: TE, apex) or that refuses a shape or dtype (SDPA's "no viable
backend" / "no available kernel" under `sdpa_kernel`, a NotImplementedError) gives a row with status
`skipped: why`; any other error (out of memory, a CUDA error, a wrong result shape) is `failed: why` with its
traceback logged, and `sd-mlperf bench` then exits 1 after printing every row.
"""

from __future__ import annotations

import functools
import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from sd_mlperf.config.load import latent_size
from sd_mlperf.config.schema import Config

ATTENTION_KERNELS = ("cudnn", "flash", "efficient", "math", "te")
NORM_KERNELS = ("torch", "compiled", "apex")


def unet_shapes(cfg: Config) -> tuple[Counter, Counter]:
    """({(B, L, S, H, D): count} of the core attentions, {(B, C, H, W, groups, silu): count} of the GroupNorms)."""
    from sd_mlperf.models.attention import SDPAttention
    from sd_mlperf.models.flops import flop_config
    from sd_mlperf.models.norm import TorchGroupNorm
    from sd_mlperf.models.unet import build_unet

    u = flop_config(cfg.model.unet)  # plain sdpa/torch modules to hook; no choice here changes a shape
    b, size = cfg.training.micro_batch_size, latent_size(cfg)
    attention, norms = Counter(), Counter()
    with torch.device("meta"):
        unet = build_unet(u)
        x = torch.empty(b, u.in_channels, size, size)
        t = torch.zeros(b, dtype=torch.long)
        context = torch.empty(b, cfg.model.text_encoder.context_length, u.context_dim)
    for module in unet.modules():
        if isinstance(module, SDPAttention):
            module.register_forward_hook(lambda m, args, out: attention.update(
                [(*args[0].shape[:2], args[1].shape[1], *args[0].shape[2:])]))
        elif isinstance(module, TorchGroupNorm):
            module.register_forward_hook(lambda m, args, out: norms.update(
                [(*args[0].shape, m.num_groups, m.act == "silu")]))
    with torch.no_grad():
        unet(x, t, context)
    return attention, norms


def _time(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    """Median milliseconds of fn() over `steps` calls after `warmup` (bench train's timer: CUDA events on a GPU)."""
    from sd_mlperf.bench.train import time_steps

    for _ in range(warmup):
        fn()
    seconds, _ = time_steps(lambda _batch: fn(), {}, steps, device)
    return statistics.median(seconds) * 1e3


UNSUPPORTED_MESSAGES = ("No viable backend", "No available kernel")
"""What SDPA raises when the one backend `sdpa_kernel` allows cannot run the inputs (CPU / CUDA wording)."""


def _status_of(exc: BaseException) -> str:
    """`skipped: why` for a kernel that is missing or refuses this shape; `failed: why` for anything else."""
    from sd_mlperf.backends import BackendUnavailable
    from sd_mlperf.bench.train import error_status

    refused = isinstance(exc, RuntimeError) and any(m in str(exc) for m in UNSUPPORTED_MESSAGES)
    return error_status(exc, skip=refused or isinstance(exc, (BackendUnavailable, NotImplementedError)), limit=160)


def _fwd_bwd_rows(make: Callable[[], Callable[[], torch.Tensor]], inputs: list[torch.Tensor], device: torch.device,
                  steps: int, warmup: int, row: dict[str, Any]) -> dict[str, Any]:
    """Time forward and forward + backward of the callable that `make` builds (a refused shape is skipped)."""
    from sd_mlperf.utils.logging import logger

    try:
        fn = make()
        grad = torch.randn_like(fn())

        def fwd_bwd() -> None:
            for t in inputs:
                t.grad = None
            fn().backward(grad)

        with torch.no_grad():
            fwd_ms = _time(fn, device, steps, warmup)
        return {"fwd_ms": fwd_ms, "fwd_bwd_ms": _time(fwd_bwd, device, steps, warmup), "status": "ok"}
    except Exception as exc:
        status = _status_of(exc)
        if status.startswith("failed"):
            logger.error("bench probe: %s %s: %s", row["kernel"], row["shape"], status, exc_info=exc)
        return {"fwd_ms": None, "fwd_bwd_ms": None, "status": status}


def _sdpa(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel == "te":
        from sd_mlperf.models.attention import TEAttention

        core = TEAttention(num_heads=q.shape[2], head_channels=q.shape[3])
        return lambda: core(q, k, v)
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[kernel]

    def call() -> torch.Tensor:
        with sdpa_kernel([backend]):  # only this backend: an unsupported shape raises instead of falling back
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2))

    return call


def probe_attention(cfg: Config, device: torch.device, *, kernels: tuple[str, ...] = ATTENTION_KERNELS,
                    steps: int = 10, warmup: int = 3) -> list[dict[str, Any]]:
    """One row per (UNet attention shape, kernel): forward and forward + backward milliseconds."""
    from sd_mlperf.models.precision import AUTOCAST_DTYPES

    dtype = AUTOCAST_DTYPES.get(cfg.training.precision, torch.float32)
    shapes, _ = unet_shapes(cfg)
    rows = []
    for (b, length, s, heads, d), count in shapes.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(b, n, heads, d, generator=g).to(device, dtype).requires_grad_()
                   for n in (length, s, s))
        for kernel in kernels:
            row = {"shape": f"B{b} L{length} S{s} H{heads} D{d}", "kind": "self" if s == length else "cross",
                   "layers": count, "kernel": kernel, "dtype": str(dtype).removeprefix("torch.")}
            row.update(_fwd_bwd_rows(functools.partial(_sdpa, kernel, q, k, v), [q, k, v], device, steps, warmup,
                                     row))
            rows.append(row)
    return rows


def _group_norm(kernel: str, x: torch.Tensor, groups: int, silu: bool) -> Callable[[], torch.Tensor]:
    from sd_mlperf.models.norm import NormBuilder, TorchGroupNorm

    act = "silu" if silu else ""
    channels = x.shape[1]
    if kernel == "apex":
        module = NormBuilder("apex")(num_groups=groups, num_channels=channels, eps=1e-5, act=act)
    else:
        module = TorchGroupNorm(groups, channels, eps=1e-5, act=act)
    module = module.to(x.device)
    if kernel == "compiled":
        module = torch.compile(module)
    return lambda: module(x)


def probe_group_norm(cfg: Config, device: torch.device, *, kernels: tuple[str, ...] = NORM_KERNELS,
                     steps: int = 10, warmup: int = 3, max_shapes: int | None = None) -> list[dict[str, Any]]:
    """One row per (UNet GroupNorm shape, kernel): forward and forward + backward milliseconds (NHWC input)."""
    from sd_mlperf.models.precision import AUTOCAST_DTYPES

    dtype = AUTOCAST_DTYPES.get(cfg.training.precision, torch.float32)
    _, shapes = unet_shapes(cfg)
    rows = []
    for (b, c, h, w, groups, silu), count in list(shapes.items())[:max_shapes]:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(b, c, h, w, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        for kernel in kernels:
            row = {"shape": f"B{b} C{c} H{h} W{w} G{groups}", "silu": silu, "layers": count, "kernel": kernel,
                   "dtype": str(dtype).removeprefix("torch.")}
            row.update(_fwd_bwd_rows(functools.partial(_group_norm, kernel, x, groups, silu), [x], device,
                                     steps, warmup, row))
            rows.append(row)
        torch._dynamo.reset()  # one compile per shape; do not pile up guards
    return rows
