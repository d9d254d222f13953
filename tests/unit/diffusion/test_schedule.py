"""Golden values of the scaled-linear schedule and the v-objective (REFERENCE.md, "Diffusion and loss")."""

from __future__ import annotations

import math

import pytest
import torch

from sd_mlperf.config.schema import DiffusionConfig
from sd_mlperf.diffusion.schedule import (
    add_noise,
    make_alphas_cumprod,
    predict_x0_and_eps,
    sample_timesteps,
    v_loss,
    v_target,
)
from tests.unit.diffusion._helpers import python_alphas_cumprod

# alphas_cumprod of the SD2 / ldm schedule (linear_start 0.00085, linear_end 0.012, 1000 steps),
# as published by ldm's DDPM buffers; ac[0] = 1 - beta_0 exactly.
GOLDEN = {0: 0.99915, 1: 0.99829603, 249: 0.67543241, 499: 0.27766965, 749: 0.05662349, 980: 0.00584378,
          999: 0.00466010}


def test_alphas_cumprod_golden_values():
    ac = make_alphas_cumprod(DiffusionConfig())
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    for t, value in GOLDEN.items():
        assert ac[t].item() == pytest.approx(value, rel=2e-7, abs=1e-8), t


def test_alphas_cumprod_is_float64_math_rounded_once():
    cfg = DiffusionConfig()
    expected = torch.tensor(python_alphas_cumprod(cfg), dtype=torch.float64).to(torch.float32)
    # Bit-exact: computed in float64 and rounded to fp32 once (an fp32 cumprod drifts by ~1e-6).
    assert torch.equal(make_alphas_cumprod(cfg), expected)
    fp32_cumprod = torch.cumprod(1 - torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, 1000) ** 2, 0)
    assert not torch.equal(fp32_cumprod, expected)


def test_alphas_cumprod_follows_config():
    ac = make_alphas_cumprod(DiffusionConfig(num_timesteps=10, beta_start=0.01, beta_end=0.02))
    assert ac.shape == (10,)
    assert ac[0].item() == pytest.approx(0.99, rel=1e-7)
    assert torch.all(ac[1:] < ac[:-1])


def test_sample_timesteps_uniform_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = sample_timesteps(20000, 1000, generator=g1)
    assert t.dtype == torch.int64 and t.shape == (20000,)
    assert torch.equal(t, sample_timesteps(20000, 1000, generator=g2))
    assert t.min().item() == 0 and t.max().item() == 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=6.0)  # 4 standard errors
    counts = torch.bincount(t // 100, minlength=10).float()
    assert counts.min() > 1800 and counts.max() < 2200  # each tenth holds about 2000


def test_add_noise_and_v_target_by_hand():
    ac = make_alphas_cumprod(DiffusionConfig())
    x0 = torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1).expand(2, 4, 2, 2)
    eps = torch.tensor([0.5, 3.0]).reshape(2, 1, 1, 1).expand(2, 4, 2, 2)
    t = torch.tensor([0, 999])
    a0, a1 = 0.99915, GOLDEN[999]
    x_t = add_noise(x0, eps, t, ac)
    v = v_target(x0, eps, t, ac)
    assert x_t[0, 0, 0, 0].item() == pytest.approx(math.sqrt(a0) * 1.0 + math.sqrt(1 - a0) * 0.5, rel=1e-6)
    assert x_t[1, 3, 1, 1].item() == pytest.approx(math.sqrt(a1) * -2.0 + math.sqrt(1 - a1) * 3.0, rel=1e-5)
    assert v[0, 2, 1, 0].item() == pytest.approx(math.sqrt(a0) * 0.5 - math.sqrt(1 - a0) * 1.0, rel=1e-6)
    assert v[1, 1, 0, 1].item() == pytest.approx(math.sqrt(a1) * 3.0 - math.sqrt(1 - a1) * -2.0, rel=1e-5)


def test_v_prediction_inverts_to_x0_and_eps():
    ac = make_alphas_cumprod(DiffusionConfig())
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 500, 990])
    x_t, v = add_noise(x0, eps, t, ac), v_target(x0, eps, t, ac)
    x0_hat, eps_hat = predict_x0_and_eps(x_t, v, ac[t].reshape(-1, 1, 1, 1))
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)


def test_v_loss_is_per_sample_mean_then_batch_mean():
    v = torch.stack([torch.ones(4, 2, 2), torch.full((4, 2, 2), 2.0)])
    v_pred = torch.zeros_like(v)
    v_pred[1, 0, 0, 0] = 2.0  # one exact element in sample 1: its MSE is 4 * 15/16
    expected = (1.0 + 4.0 * 15 / 16) / 2
    assert v_loss(v_pred, v).item() == pytest.approx(expected, rel=1e-7)


def test_v_loss_computes_in_fp32():
    v = torch.full((2, 4, 2, 2), 300.0, dtype=torch.float16)
    loss = v_loss(torch.zeros_like(v), v)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(90000.0)  # 300^2 overflows nothing in fp32 (fp16 max 65504)


def test_timesteps_and_alphas_follow_the_device():
    """Device plumbing, checked on the CPU with the meta device: t and the gathered alphas land where asked."""
    t = sample_timesteps(3, 1000, device="meta")
    assert t.device.type == "meta" and t.dtype == torch.int64
    x = torch.empty(3, 4, 2, 2, device="meta")
    assert add_noise(x, x, t, make_alphas_cumprod(DiffusionConfig())).device.type == "meta"
