"""Scaled-linear noise schedule and the v-objective: pure tensor functions (REFERENCE.md).

Shapes: B batch, C channels, H/W latent size. `a_t` is alphas_cumprod[t].
"""

from __future__ import annotations

import torch

from sd_mlperf.config.schema import DiffusionConfig


def make_alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """alphas_cumprod (num_timesteps,) computed in float64 as the reference does, stored as fp32."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def sample_timesteps(batch_size: int, num_timesteps: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ uniform{0..num_timesteps-1}, one per sample (int64)."""
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)


def _at(alphas_cumprod: torch.Tensor, t_B: torch.Tensor, ndim: int) -> torch.Tensor:
    a = alphas_cumprod.to(t_B.device)[t_B]
    return a.reshape(-1, *([1] * (ndim - 1)))


def add_noise(x0_BCHW: torch.Tensor, noise_BCHW: torch.Tensor, t_B: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    a = _at(alphas_cumprod, t_B, x0_BCHW.ndim)
    return a.sqrt() * x0_BCHW + (1.0 - a).sqrt() * noise_BCHW


def v_target(x0_BCHW: torch.Tensor, noise_BCHW: torch.Tensor, t_B: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
    a = _at(alphas_cumprod, t_B, x0_BCHW.ndim)
    return a.sqrt() * noise_BCHW - (1.0 - a).sqrt() * x0_BCHW


def v_loss(v_pred_BCHW: torch.Tensor, v_BCHW: torch.Tensor) -> torch.Tensor:
    """MSE averaged over C,H,W per sample, then over the batch (computed in fp32)."""
    per_sample = (v_pred_BCHW.float() - v_BCHW.float()).pow(2).flatten(1).mean(dim=1)
    return per_sample.mean()


def predict_x0_and_eps(x_t: torch.Tensor, v: torch.Tensor, a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a v-prediction: x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x."""
    sa, s1a = a_t.sqrt(), (1.0 - a_t).sqrt()
    return sa * x_t - s1a * v, sa * v + s1a * x_t
