"""DDIM sampler: reference timesteps and alphas_prev, a 2-step trajectory against hand-computed values, CFG."""

from __future__ import annotations

import math

import pytest
import torch

from sd_mlperf.config.schema import DiffusionConfig
from sd_mlperf.diffusion.ddim import (
    PromptNoise,
    ddim_sample,
    ddim_timesteps,
    guided_v,
    initial_noise,
    make_ddim_schedule,
    prompt_seed,
)
from sd_mlperf.diffusion.schedule import make_alphas_cumprod
from tests.unit.diffusion._helpers import python_alphas_cumprod

ACP = make_alphas_cumprod(DiffusionConfig())
# prompt_seed(0, 0..2) and prompt_seed(2024, 29999), as released: odd and even values.
PINNED_SEEDS = [6375474604893067239, 8514611595815388268, 6745496412263418813]
PINNED_LAST = 2979538746774483229


def test_timesteps_are_the_reference_ones():
    steps = ddim_timesteps(1000, 50)
    assert steps.tolist() == [1 + 20 * i for i in range(50)] and steps.dtype == torch.int64
    assert ddim_timesteps(1000, 1).tolist() == [1] and ddim_timesteps(1000, 500).tolist()[-1] == 999
    sched = make_ddim_schedule(ACP, 50)
    assert sched.timesteps[0].item() == 981 and sched.timesteps[-1].item() == 1
    assert sched.timesteps.tolist() == list(range(981, 0, -20))
    # alphas_prev: the next (smaller) timestep's alpha; alphas_cumprod[0] for the last step.
    assert torch.equal(sched.alphas, ACP[sched.timesteps])
    assert torch.equal(sched.alphas_prev[:-1], sched.alphas[1:])
    assert sched.alphas_prev[-1].item() == ACP[0].item()
    assert torch.count_nonzero(sched.sigmas) == 0
    # Constants stored as float32 whatever the input's dtype: a float64 schedule would turn the latents float64.
    wide = make_ddim_schedule(ACP.double(), 50, eta=0.5)
    assert {wide.alphas.dtype, wide.alphas_prev.dtype, wide.sigmas.dtype} == {torch.float32}


def test_eta_sigmas_match_the_formula():
    sched = make_ddim_schedule(ACP, 4, eta=1.0)
    hand = python_alphas_cumprod()
    for i, t in enumerate([751, 501, 251, 1]):
        a, ap = hand[t], (hand[t - 250] if t > 1 else hand[0])
        expected = math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        assert sched.sigmas[i].item() == pytest.approx(expected, rel=1e-5)


def test_bad_steps_and_eta_raise():
    # The reference's spacing range(0, T, T // S) + 1 only works when S divides T, and S = T would index acp[T].
    for bad in (0, 3, 7, 1000, 1001):
        with pytest.raises(ValueError, match="eval.ddim_steps"):
            ddim_timesteps(1000, bad)
    with pytest.raises(ValueError, match="eval.eta"):
        make_ddim_schedule(ACP, 10, eta=-1.0)


def _toy_unet(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """v = mean(ctx) * x + t / 1000, per sample: simple enough to follow by hand."""
    scale = ctx.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return scale * x + t.float().view(-1, 1, 1, 1) / 1000.0


def _hand_trajectory(x: float, guidance: float) -> float:
    """Two DDIM steps (t = 501 then 1) with cond ctx = 1, uncond ctx = 0, in float64 by hand."""
    hand = python_alphas_cumprod()
    for t, t_prev in ((501, 1), (1, None)):
        a = hand[t]
        ap = hand[t_prev] if t_prev is not None else hand[0]
        v_u = t / 1000.0
        v_c = x + t / 1000.0
        v = v_u + guidance * (v_c - v_u)
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v
        eps = math.sqrt(a) * v + math.sqrt(1 - a) * x
        x = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
    return x


@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_two_step_trajectory_matches_hand_computation(guidance):
    sched = make_ddim_schedule(ACP, 2)
    assert sched.timesteps.tolist() == [501, 1]
    x_T = torch.tensor([0.3, -1.2]).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    cond, uncond = torch.ones(2, 3, 4), torch.zeros(1, 3, 4)
    out = ddim_sample(_toy_unet, x_T, cond, uncond, sched, guidance_scale=guidance)
    for row, x in enumerate([0.3, -1.2]):
        expected = _hand_trajectory(x, guidance)
        torch.testing.assert_close(out[row], torch.full((1, 2, 2), expected), rtol=2e-5, atol=2e-6)


def test_cfg_scale_one_is_the_conditional_model():
    calls = []

    def unet(x, t, ctx):
        calls.append(x.shape[0])
        return _toy_unet(x, t, ctx) + 0.1 * ctx.float().sum(dim=(1, 2)).view(-1, 1, 1, 1)

    x = torch.randn(3, 4, 2, 2)
    t = torch.full((3,), 501)
    cond, uncond = torch.randn(3, 5, 6), torch.randn(1, 5, 6)
    assert torch.equal(guided_v(unet, x, t, cond, uncond, 1.0), unet(x, t, cond))
    assert calls[0] == 3  # no doubled batch when guidance is 1
    guided = guided_v(unet, x, t, cond, uncond, 8.0)
    v_u, v_c = unet(x, t, uncond.expand_as(cond)), unet(x, t, cond)
    torch.testing.assert_close(guided, v_u + 8.0 * (v_c - v_u))
    assert not torch.allclose(guided, v_c)


def test_noise_depends_only_on_seed_and_prompt_index():
    full = initial_noise(7, [0, 1, 2, 3], (4, 8, 8))
    assert torch.equal(initial_noise(7, [2], (4, 8, 8))[0], full[2])
    assert torch.equal(initial_noise(7, [3, 0], (4, 8, 8)), full[[3, 0]])
    assert not torch.equal(initial_noise(8, [0], (4, 8, 8))[0], full[0])
    assert not torch.equal(full[0], full[1])


def test_eta_noise_is_per_prompt_and_required():
    sched = make_ddim_schedule(ACP, 4, eta=1.0)
    x_T = initial_noise(0, [0, 1, 2], (1, 2, 2))
    cond, uncond = torch.ones(3, 2, 2), torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(_toy_unet, x_T, cond, uncond, sched, guidance_scale=2.0)
    # Batch [0, 1, 2] vs prompt 1 alone: same image for prompt 1.
    batch = ddim_sample(_toy_unet, x_T, cond, uncond, sched, guidance_scale=2.0, noise=PromptNoise(5, [0, 1, 2]))
    alone = ddim_sample(_toy_unet, x_T[1:2], cond[1:2], uncond, sched, guidance_scale=2.0, noise=PromptNoise(5, [1]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)


def test_eta_trajectory_matches_hand_computation():
    """eta = 1 over 2 steps, by hand in float64: the noise term and the 1 - a_prev - sigma^2 direction both count."""
    sched = make_ddim_schedule(ACP, 2, eta=1.0)
    hand = python_alphas_cumprod()
    x_T = initial_noise(3, [0, 1], (1, 2, 2))
    cond, uncond = torch.ones(2, 3, 4), torch.zeros(1, 3, 4)
    out = ddim_sample(_toy_unet, x_T, cond, uncond, sched, guidance_scale=2.0, noise=PromptNoise(9, [0, 1]))
    draws = PromptNoise(9, [0, 1])  # the same generators, drawn in the sampler's order
    x = x_T.double()
    for t, t_prev in ((501, 1), (1, None)):
        a, ap = hand[t], (hand[t_prev] if t_prev is not None else hand[0])
        sigma = math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        v = t / 1000.0 + 2.0 * x  # v_u = t/1000 (ctx 0), v_c = x + t/1000 (ctx 1), guidance 2
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v
        eps = math.sqrt(a) * v + math.sqrt(1 - a) * x
        x = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps + sigma * draws.draw((1, 2, 2)).double()
    assert sched.sigmas[0].item() > 0.01  # a noise term that matters at the first step
    torch.testing.assert_close(out.double(), x, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("precision,dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_unet_runs_under_the_evaluation_precision(precision, dtype):
    """eval.precision reaches the UNet: autocast on (with its dtype) for bf16/fp16, off for fp32; latents stay fp32."""
    seen = []

    def unet(x, t, ctx):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), x.dtype))
        return _toy_unet(x, t, ctx)

    sched = make_ddim_schedule(ACP, 2)
    out = ddim_sample(unet, torch.ones(1, 1, 2, 2), torch.ones(1, 3, 4), torch.zeros(1, 3, 4), sched,
                      precision=precision)
    assert out.dtype == torch.float32 and len(seen) == 2
    for enabled, autocast_dtype, x_dtype in seen:
        assert enabled == (dtype is not None) and x_dtype == torch.float32
        if dtype is not None:
            assert autocast_dtype == dtype


def test_prompt_seeds_are_pinned():
    """The evaluation images depend on these seeds: a change would silently make scores incomparable across versions."""
    assert [prompt_seed(0, i) for i in range(3)] == PINNED_SEEDS
    assert prompt_seed(2024, 29999) == PINNED_LAST


def test_noise_and_steps_land_on_the_requested_device():
    """Device plumbing, checked on the CPU with the meta device (no data, only placement)."""
    assert initial_noise(0, [0, 1], (4, 2, 2), "meta").device.type == "meta"
    assert PromptNoise(0, [3]).draw((4, 2, 2), torch.device("meta")).device.type == "meta"
    assert initial_noise(0, [0], (1, 2, 2)).dtype == torch.float32
