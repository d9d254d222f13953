"""The reference schedule written out in plain Python, shared by the schedule and DDIM golden tests."""

from __future__ import annotations

import math

from sd_mlperf.config.schema import DiffusionConfig


def python_alphas_cumprod(cfg: DiffusionConfig | None = None) -> list[float]:
    """alphas_cumprod in plain float64 Python, one term at a time: betas = linspace(sqrt(b0), sqrt(b1), T)^2."""
    cfg = cfg or DiffusionConfig()
    lo, hi, n = math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), cfg.num_timesteps
    out, acc = [], 1.0
    for i in range(n):
        beta = (lo + (hi - lo) * i / (n - 1)) ** 2
        acc *= 1.0 - beta
        out.append(acc)
    return out
