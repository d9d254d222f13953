"""The torch backend's optimizer step with unscale and clipping folded into fused AdamW (grad_scale/found_inf),
and parallel.half_weights (fp16/bf16 weights, fp32 masters: NVIDIA's O2).

Tolerances: the folded step divides each gradient by (loss scale / clip coefficient) inside the kernel where the
previous path multiplied by 1/scale and then by the coefficient; both are exact for the power-of-two scale, and
the coefficient costs at most an ulp per gradient, so weights agree to rtol 1e-5. Half weights change what the
forward reads (weights rounded to fp16/bf16, GroupNorm's weight included), so after 3 steps the updates agree
to 2% (fp16; measured 0.15%) or 10% (bf16; measured 0.5%) of each tensor's largest update. Gradients that were
never cleared (a bug this caught) or a lost step are 50-100%.
"""

from __future__ import annotations

import io

import pytest
import torch
from parallel_helpers import cpu_dist, global_batch, loss_fn, make_cfg, tiny_model, train_step

from sd_mlperf.models.precision import autocast
from sd_mlperf.parallel.data_parallel import apply_data_parallel
from sd_mlperf.parallel.optimizer import LRSchedule


def _cfg(precision="fp16", clip=0.05, half=False):
    cfg = make_cfg(precision=precision)
    cfg.optim.grad_clip_norm = clip
    cfg.training.initial_loss_scale = 1024.0
    cfg.parallel.half_weights = half
    return cfg


def _previous_path(cfg, steps):
    """The step as it was before folding: explicit unscale + inf check, explicit clip, then fused AdamW."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=True)
    sched = LRSchedule(cfg.optim, 8)
    scale = torch.full((1,), cfg.training.initial_loss_scale)
    for step in range(steps):
        x, y = global_batch(step)
        opt.zero_grad(set_to_none=True)
        with autocast(cfg.training.precision, torch.device("cpu")):
            loss = loss_fn(model(x), y)
        (loss * scale).backward()
        grads = [p.grad for p in model.parameters()]
        found_inf = torch.zeros(1)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale.double().reciprocal().float())
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, torch.clamp(cfg.optim.grad_clip_norm / (norm + 1e-6), max=1.0))
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step)
        opt.found_inf = found_inf.reshape(())
        opt.step()
    return model, norm


def _train(cfg, steps, dp=None, start=0):
    dp = dp or apply_data_parallel(tiny_model(), cfg, cpu_dist())
    sched = LRSchedule(cfg.optim, 8)
    for step in range(start, start + steps):
        _, ok, norm = train_step(dp, cfg, step, sched.lr_at(step))
    return dp, ok, norm


def test_folded_step_matches_explicit_unscale_and_clip():
    cfg = _cfg()
    dp, ok, norm = _train(cfg, 3)
    ref, ref_norm = _previous_path(cfg, 3)
    assert bool(ok)
    assert float(norm) > cfg.optim.grad_clip_norm  # clipping was active in every step compared
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    for got, want in zip(dp.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _forbid_host_syncs(monkeypatch):
    def sync(*_args, **_kwargs):
        raise AssertionError("host sync in the optimizer step")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


@pytest.mark.parametrize("half", [False, True], ids=["fp32-weights", "half-weights"])
def test_step_reads_nothing_back_to_the_host(monkeypatch, half):
    cfg = _cfg(half=half)
    dp = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    x, y = global_batch(0)
    dp.zero_grad()
    with autocast("fp16", torch.device("cpu")):
        dp.backward(loss_fn(dp(x), y))
    lr = torch.tensor(1e-3, dtype=torch.float64)  # the graphed step's device lr
    with monkeypatch.context() as m:
        _forbid_host_syncs(m)
        ok, _ = dp.step(lr)
    assert bool(ok)
    # The check can fail: the old clip_grad_norm_ style (a float of the norm) is a host sync.
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="host sync"):
        _forbid_host_syncs(m)
        float(torch.linalg.vector_norm(torch.ones(2)))


@pytest.mark.parametrize("half", [False, True], ids=["fp32-weights", "half-weights"])
def test_inf_gradient_skips_the_step(half):
    cfg = _cfg(half=half)
    dp, _, _ = _train(cfg, 1)
    before = [p.detach().clone() for p in [*dp.parameters(), *dp.master_params]]
    adam = {k: v.clone() for k, v in dp.optimizer.state[dp.optimizer.param_groups[0]["params"][0]].items()}
    x, y = global_batch(5)
    dp.zero_grad()
    with autocast("fp16", torch.device("cpu")):
        dp.backward(loss_fn(dp(x), y) * float("inf"))
    ok, norm = dp.step(1e-3)
    assert not bool(ok) and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, [*dp.parameters(), *dp.master_params], strict=True))
    state = dp.optimizer.state[dp.optimizer.param_groups[0]["params"][0]]
    assert all(torch.equal(state[k], v) for k, v in adam.items())
    assert float(dp.loss_scale) == 512.0 and int(dp.num_skipped_steps) == 1


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_weights_track_fp32_masters_and_match_the_fp32_weight_path(precision):
    cfg = _cfg(precision=precision, half=True)
    dp, ok, _ = _train(cfg, 3)
    assert bool(ok)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    assert all(p.dtype == dtype for p in dp.parameters()) and all(m.dtype == torch.float32 for m in dp.master_params)
    for p, m in zip(dp.parameters(), dp.master_params, strict=True):
        assert torch.equal(p, m.to(dtype))  # the weights are the masters' rounding
    ref, _, _ = _train(_cfg(precision=precision), 3)
    init = tiny_model()
    for m, r, p0 in zip(dp.master_params, ref.parameters(), init.parameters(), strict=True):
        update, ref_update = m.detach() - p0.detach(), r.detach() - p0.detach()
        ratio = float((update - ref_update).abs().max() / ref_update.abs().max())
        assert ratio <= (0.02 if precision == "fp16" else 0.1), ratio


def test_half_weights_resume_exactly():
    cfg = _cfg(half=True)
    straight, _, _ = _train(cfg, 4)
    first, _, _ = _train(cfg, 2)
    # Through bytes, as a checkpoint: Optimizer.load_state_dict would otherwise share the saved tensors.
    buffer = io.BytesIO()
    torch.save({"dp": first.state_dict(), "model": first.unwrapped.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    state, weights = saved["dp"], saved["model"]
    assert "master_params" in state
    fresh = apply_data_parallel(tiny_model(seed=7), cfg, cpu_dist())  # other init: everything must come from state
    fresh.unwrapped.load_state_dict(weights)
    fresh.load_state_dict(state)
    resumed, _, _ = _train(cfg, 2, dp=fresh, start=2)
    for a, b in zip([*resumed.parameters(), *resumed.master_params], [*straight.parameters(),
                                                                      *straight.master_params], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="half_weights"):
        apply_data_parallel(tiny_model(), _cfg(), cpu_dist()).load_state_dict(state)


def test_half_weights_need_a_half_precision():
    with pytest.raises(ValueError, match="training.precision"):
        apply_data_parallel(tiny_model(), _cfg(precision="fp32", half=True), cpu_dist())
