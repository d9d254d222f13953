"""The torch backend on one process: AdamW numerics, overflow skipping, clipping, accumulation, exact resume."""

from __future__ import annotations

import pytest
import torch
from parallel_helpers import cpu_dist, global_batch, loss_fn, make_cfg, tiny_model, train_step

from sd_mlperf.models.precision import autocast
from sd_mlperf.parallel.data_parallel import apply_data_parallel
from sd_mlperf.parallel.optimizer import LRSchedule


def _train(dp, cfg, steps, start=0):
    sched = LRSchedule(cfg.optim, 8)
    losses = []
    for step in range(start, start + steps):
        loss, ok, norm = train_step(dp, cfg, step, sched.lr_at(step))
        losses.append(loss)
    return losses, ok, norm


def test_matches_plain_adamw():
    cfg = make_cfg()
    dp = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    assert dp.resolution.name == "torch" and dp.module is dp.unwrapped
    ref = tiny_model()
    opt = torch.optim.AdamW(ref.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = LRSchedule(cfg.optim, 8)
    for step in range(3):
        x, y = global_batch(step)
        opt.zero_grad()
        loss = loss_fn(ref(x), y)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step)
        opt.step()
    _, ok, got_norm = _train(dp, cfg, 3)
    assert ok.dtype == torch.bool and ok.shape == () and bool(ok)
    assert torch.allclose(got_norm, norm, rtol=1e-6)
    for a, b in zip(dp.unwrapped.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(dp.unwrapped.conv_in.weight, tiny_model().conv_in.weight)  # weights did move


def test_nonfinite_gradients_skip_the_step_and_back_off():
    cfg = make_cfg(precision="fp16")
    dp = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    _train(dp, cfg, 1)  # fp16 CPU autocast path
    before = [p.detach().clone() for p in dp.parameters()]
    state_before = {k: v.clone() for k, v in dp.optimizer.state[dp.params[0]].items()}
    scale = dp.loss_scale.item()
    x, y = global_batch(5)
    dp.zero_grad()
    loss = loss_fn(dp(x), y) * float("inf")
    dp.backward(loss)
    ok, _ = dp.step(1e-3)
    assert not bool(ok)
    assert all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))
    for k, v in dp.optimizer.state[dp.params[0]].items():
        assert torch.equal(v, state_before[k]), k  # step counter and moments untouched too
    assert dp.loss_scale.item() == scale / 2
    assert int(dp.num_skipped_steps.item()) == 1


def test_bf16_nan_step_is_skipped_without_scaling():
    cfg = make_cfg(precision="bf16")
    dp = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    before = [p.detach().clone() for p in dp.parameters()]
    x, y = global_batch(0)
    dp.zero_grad()
    with autocast("bf16", torch.device("cpu")):
        loss = loss_fn(dp(x), y) * float("nan")
    dp.backward(loss)
    ok, _ = dp.step(1e-3)
    assert not bool(ok) and int(dp.num_skipped_steps.item()) == 1
    assert dp.loss_scale.item() == 1.0  # no loss scaling outside fp16
    assert all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))  # nothing corrupt to save


def test_loss_scale_is_applied_in_backward():
    cfg = make_cfg(precision="fp16")
    cfg.training.initial_loss_scale = 1024.0
    dp = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    x, y = global_batch(0)
    dp.zero_grad()
    dp.backward(loss_fn(dp(x), y))
    scaled = dp.unwrapped.conv_out.bias.grad.clone()
    ref = tiny_model()
    loss_fn(ref(x), y).backward()
    torch.testing.assert_close(scaled / 1024.0, ref.conv_out.bias.grad, rtol=1e-5, atol=1e-8)


def test_grad_clipping():
    cfg = make_cfg()
    cfg.optim.grad_clip_norm = 1e-3
    dp = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    x, y = global_batch(0)
    dp.zero_grad()
    dp.backward(loss_fn(dp(x), y))
    _, norm = dp.step(0.0)  # lr 0: only the clipping is visible, in the grads
    assert norm.item() > 1e-3
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dp.parameters()]))
    assert abs(clipped.item() - 1e-3) < 1e-6


def test_grad_accumulation_equals_one_big_batch():
    big_cfg = make_cfg()
    acc_cfg = make_cfg(micro_batch_size=4)
    acc_cfg.training.grad_accumulation_steps = 2
    big = apply_data_parallel(tiny_model(), big_cfg, cpu_dist())
    acc = apply_data_parallel(tiny_model(), acc_cfg, cpu_dist())
    lr = LRSchedule(acc_cfg.optim, 8).lr_at(0)
    x, y = global_batch(0)
    big.zero_grad()
    big.backward(loss_fn(big(x), y))
    big_grads = [p.grad.clone() for p in big.parameters()]
    _, big_norm = big.step(lr)
    acc.zero_grad()
    with acc.accumulating():
        acc.backward(loss_fn(acc(x[:4]), y[:4]))
    acc.backward(loss_fn(acc(x[4:]), y[4:]))
    acc.finish_grad_sync()
    # The gradients themselves, not only the weights: one AdamW step from zero moments moves each weight by about
    # lr x sign(grad), which hides a missing 1/N (a gradient twice as large moves the weights just as far).
    for n, (g, p) in enumerate(zip(big_grads, acc.parameters())):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=f"parameter {n}")
    _, acc_norm = acc.step(lr)
    torch.testing.assert_close(acc_norm, big_norm, rtol=1e-5, atol=0)
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_bit_exact(precision):
    cfg = make_cfg(precision=precision)
    full = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    full_losses, _, _ = _train(full, cfg, 4)

    first = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    _train(first, cfg, 2)
    weights = {k: v.clone() for k, v in first.unwrapped.state_dict().items()}
    state = first.state_dict()
    assert state["optimizer"] is not None and state["world_size"] == 1

    resumed_model = tiny_model(seed=123)  # other init: everything must come from the checkpoint
    resumed_model.load_state_dict(weights)
    resumed = apply_data_parallel(resumed_model, cfg, cpu_dist())
    resumed.load_state_dict(state)
    resumed_losses, _, _ = _train(resumed, cfg, 2, start=2)
    assert [loss.item() for loss in resumed_losses] == [loss.item() for loss in full_losses[2:]]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(full.loss_scale, resumed.loss_scale)


def test_load_state_refuses_other_world_or_backend():
    cfg = make_cfg()
    dp = apply_data_parallel(tiny_model(), cfg, cpu_dist())
    state = dp.state_dict()
    with pytest.raises(ValueError, match="same parallel.num_nodes"):
        dp.load_state_dict(state | {"world_size": 2})
    with pytest.raises(ValueError, match="parallel.backend"):
        dp.load_state_dict(state | {"backend": "mcore"})


def test_mcore_refused_on_cpu(monkeypatch):
    import sd_mlperf.backends as B

    cfg = make_cfg(backend="mcore")
    with pytest.raises(RuntimeError, match="parallel.backend"):
        apply_data_parallel(tiny_model(), cfg, cpu_dist())
    monkeypatch.setattr(B, "cuda_available", lambda: True)  # probe passes, the device still is a CPU
    with pytest.raises(RuntimeError, match="parallel.backend=torch"):
        apply_data_parallel(tiny_model(), cfg, cpu_dist())
