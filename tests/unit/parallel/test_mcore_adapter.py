"""The megatron-core backend on CPU/gloo through the test-only CUDA->CPU harness.

1 process: AdamW numerics (weight decay on every parameter, as the reference), overflow skipping,
exact resume (NCHW and NHWC conv weights). 2 gloo processes (one spawned job): DDP +
DistributedOptimizer equal the 1-process run on the same global batch (NHWC weights too), ranks
hold identical parameters, and resume is bit-exact.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.multiprocessing as mp
from mcore_cpu_harness import cuda_on_cpu
from parallel_helpers import cpu_dist, free_port, global_batch, loss_fn, make_cfg, shard, tiny_model

from sd_mlperf.backends import Resolution, package_available
from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
from sd_mlperf.parallel.optimizer import LRSchedule
from tests.multiprocess_helpers import set_torchrun_env

pytestmark = pytest.mark.skipif(not package_available("megatron.core"),
                                reason="megatron-core is not installed (pip install 'sd_mlperf[gpu]')")

RESOLUTION = Resolution("parallel", "parallel.backend", "mcore", "mcore", "test harness")
WORLD = 2
STEPS = 4
SPLIT = 2


def _build(cfg, dist, seed=0, model=None, channels_last=False):
    from sd_mlperf.parallel.mcore_adapter import McoreDataParallel

    model = model if model is not None else tiny_model(seed)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # apply_data_parallel refuses mcore without CUDA; the harness stands in for CUDA, so build directly.
    return McoreDataParallel(model, cfg, dist, RESOLUTION)


def _run(dp, cfg, start, steps, rank=0, world=1, scale_loss=1.0):
    sched = LRSchedule(cfg.optim, 8)
    losses = []
    for step in range(start, start + steps):
        x, y = global_batch(step)
        dp.zero_grad()
        loss = loss_fn(dp(shard(x, rank, world)), shard(y, rank, world))
        dp.backward(loss * scale_loss)
        dp.finish_grad_sync()
        ok, norm = dp.step(sched.lr_at(step))
        losses.append(loss.item())
    return losses, bool(ok), norm.item()


def _reference_params(steps):
    """Plain torch AdamW (weight decay on all parameters) on the whole global batch."""
    cfg = make_cfg()
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = LRSchedule(cfg.optim, 8)
    for step in range(steps):
        x, y = global_batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def harness():
    with cuda_on_cpu():
        yield
    destroy_distributed()


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_matches_plain_adamw(harness, distributed_optimizer):
    cfg = make_cfg(backend="mcore", distributed_optimizer=distributed_optimizer)
    dp = _build(cfg, cpu_dist())
    _, ok, _ = _run(dp, cfg, 0, 3)
    assert ok
    for got, want in zip(dp.parameters(), _reference_params(3)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_grad_clipping_matches_the_torch_backend(harness, distributed_optimizer):
    from sd_mlperf.parallel.torch_adapter import TorchDataParallel

    cfgs = [make_cfg(backend=b, distributed_optimizer=distributed_optimizer) for b in ("mcore", "torch")]
    for cfg in cfgs:
        cfg.optim.grad_clip_norm = 1e-2  # below the grad norm of every step: each one is clipped
    mcore = _build(cfgs[0], cpu_dist())
    _, _, mcore_norm = _run(mcore, cfgs[0], 0, 3)
    torch_dp = TorchDataParallel(tiny_model(), cfgs[1], cpu_dist(), RESOLUTION)
    _, _, torch_norm = _run(torch_dp, cfgs[1], 0, 3)
    assert mcore_norm > 1e-2 and mcore_norm == pytest.approx(torch_norm, rel=1e-5)  # the norm before clipping
    for got, want in zip(mcore.parameters(), torch_dp.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fp16_overflow_is_skipped(harness):
    cfg = make_cfg(backend="mcore", precision="fp16")
    dp = _build(cfg, cpu_dist())
    _run(dp, cfg, 0, 1)
    before = [p.detach().clone() for p in dp.parameters()]
    scale = dp.loss_scale.item()
    assert scale == cfg.training.initial_loss_scale
    _, ok, _ = _run(dp, cfg, 1, 1, scale_loss=float("inf"))
    assert not ok and dp.num_skipped_steps == 1
    assert dp.loss_scale.item() == scale / 2  # hysteresis 1: the first overflow backs off
    assert all(torch.equal(a, b) for a, b in zip(before, dp.parameters()))


@pytest.mark.parametrize("channels_last", [False, True])
def test_resume_is_bit_exact_one_process(harness, channels_last):
    cfg = make_cfg(backend="mcore", precision="fp16")
    full = _build(cfg, cpu_dist(), channels_last=channels_last)
    full_losses, _, _ = _run(full, cfg, 0, STEPS)
    full_params = [p.detach().clone() for p in full.parameters()]
    destroy_distributed()

    first = _build(cfg, cpu_dist(), channels_last=channels_last)
    _run(first, cfg, 0, SPLIT)
    weights = {k: v.clone() for k, v in first.unwrapped.state_dict().items()}
    state = first.state_dict()
    destroy_distributed()

    model = tiny_model(seed=7)
    model.load_state_dict(weights)
    resumed = _build(cfg, cpu_dist(), model=model, channels_last=channels_last)
    resumed.load_state_dict(state)
    losses, _, _ = _run(resumed, cfg, SPLIT, STEPS - SPLIT)
    assert losses == full_losses[SPLIT:]
    assert all(torch.equal(a, b) for a, b in zip(full_params, resumed.parameters()))


def test_reshard_to_another_world_size_is_refused_with_the_fix(harness):
    cfg = make_cfg(backend="mcore")
    dp = _build(cfg, cpu_dist())
    _run(dp, cfg, 0, 1)  # megatron's state_dict needs a step taken
    state = {**dp.state_dict(), "world_size": 2}  # as if 2 ranks had saved it
    with pytest.raises(ValueError, match="mcore resumes only on the world size it saved.*parallel.backend=torch"):
        dp.load_state_dict(state, reshard=True)
    with pytest.raises(ValueError, match="saved with 2 data-parallel ranks"):
        dp.load_state_dict(state)


def test_distributed_optimizer_state_refuses_the_other_conv_layout(harness):
    cfg = make_cfg(backend="mcore")
    nhwc = _build(cfg, cpu_dist(), channels_last=True)
    assert nhwc.num_nhwc_weights == 2  # conv_in, conv_out (3x3)
    _run(nhwc, cfg, 0, 1)
    state = nhwc.state_dict()
    destroy_distributed()
    nchw = _build(cfg, cpu_dist())
    # Flat shards in NHWC order would land scrambled in NCHW slices.
    with pytest.raises(ValueError, match="2 conv weights in channels-last.*model.unet.channels_last.*true"):
        nchw.load_state_dict(state)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    set_torchrun_env(rank, WORLD, port)
    cfg = make_cfg(world_size=WORLD, backend="mcore")
    cfg.run.device = "cpu"
    dist = init_distributed(cfg.run, cfg.parallel)
    results = {}
    with cuda_on_cpu():
        for distopt, overlap, channels_last in ((True, True, False), (False, False, False), (True, True, True)):
            cfg = make_cfg(world_size=WORLD, backend="mcore", distributed_optimizer=distopt)
            cfg.parallel.overlap_grad_reduce = overlap
            # Other weights per rank: broadcast_params must fix them.
            dp = _build(cfg, dist, seed=rank, channels_last=channels_last)
            _, ok, norm = _run(dp, cfg, 0, STEPS, rank, WORLD)
            key = f"distopt={distopt}" + (",nhwc" if channels_last else "")
            results[key] = {"params": [p.detach().clone() for p in dp.parameters()], "ok": ok, "norm": norm,
                            "nhwc": dp.num_nhwc_weights}
        cfg = make_cfg(world_size=WORLD, backend="mcore", precision="fp16")
        dp = _build(cfg, dist)
        _run(dp, cfg, 0, SPLIT, rank, WORLD)
        weights = {k: v.clone() for k, v in dp.unwrapped.state_dict().items()}
        state = [dp.state_dict()]
        torch.distributed.broadcast_object_list(state, src=0)  # every rank reads rank 0's file
        _, _, _ = _run(dp, cfg, SPLIT, STEPS - SPLIT, rank, WORLD)
        results["uninterrupted"] = [p.detach().clone() for p in dp.parameters()]
        model = tiny_model(seed=5)
        model.load_state_dict(weights)
        resumed = _build(cfg, dist, model=model)
        resumed.load_state_dict(state[0])
        _run(resumed, cfg, SPLIT, STEPS - SPLIT, rank, WORLD)
        results["resumed"] = [p.detach().clone() for p in resumed.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        del dp, resumed
        gc.collect()
        torch.distributed.barrier()  # no rank tears down while the other still communicates
    destroy_distributed()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    expected = _reference_params(STEPS)
    for res in ranks:
        assert res["distopt=True,nhwc"]["nhwc"] == 2  # sharded NHWC weights still match on both ranks
        for key in ("distopt=True", "distopt=False", "distopt=True,nhwc"):
            assert res[key]["ok"]
            for got, want in zip(res[key]["params"], expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(res["resumed"], res["uninterrupted"]):
            assert torch.equal(got, want)
    for a, b in zip(ranks[0]["distopt=True"]["params"], ranks[1]["distopt=True"]["params"]):
        assert torch.equal(a, b)
