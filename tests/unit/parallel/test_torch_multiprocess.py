"""2 gloo processes (torch backend, Slurm-style launch) equal 1 process on the same global batch; exact resume.

One spawned job runs every check (process start-up costs about 10 s); the parent compares.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.multiprocessing as mp
from parallel_helpers import cpu_dist, free_port, global_batch, loss_fn, make_cfg, shard, tiny_model

from sd_mlperf.parallel.data_parallel import apply_data_parallel
from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
from sd_mlperf.parallel.optimizer import LRSchedule

WORLD = 2
STEPS = 4
SPLIT = 2  # the resume check saves after this many steps


def _run(dp, cfg, rank, world, start, steps):
    sched = LRSchedule(cfg.optim, 8)
    losses = []
    for step in range(start, start + steps):
        x, y = global_batch(step)
        dp.zero_grad()
        loss = loss_fn(dp(shard(x, rank, world)), shard(y, rank, world))
        dp.backward(loss)
        dp.finish_grad_sync()
        ok, norm = dp.step(sched.lr_at(step))
        losses.append(loss.item())
    return losses, bool(ok), norm.item()


def _params(dp):
    return [p.detach().clone() for p in dp.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # Launched "by Slurm": rank, world and MASTER_ADDR (first host of the node list) come from SLURM_* variables.
    os.environ.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(WORLD), "SLURM_LOCALID": str(rank),
                       "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)})
    results = {}
    cfg = make_cfg(world_size=WORLD)
    cfg.run.device = "cpu"
    dist = init_distributed(cfg.run, cfg.parallel)
    try:
        for sharded in (False, True):  # the ZeRO one last: the overflow check below uses it
            cfg = make_cfg(world_size=WORLD, distributed_optimizer=sharded)
            # Each rank builds other initial weights: DDP must broadcast rank 0's.
            dp = apply_data_parallel(tiny_model(seed=rank), cfg, dist)
            _, ok, norm = _run(dp, cfg, rank, WORLD, 0, STEPS)
            results[f"sharded={sharded}"] = {"params": _params(dp), "ok": ok, "norm": norm,
                                             "zero": type(dp.optimizer).__name__}
        # An overflow on one rank only reaches both through the all-reduce: both skip the same step.
        before = _params(dp)
        x, y = global_batch(STEPS)
        dp.zero_grad()
        loss = loss_fn(dp(shard(x, rank, WORLD)), shard(y, rank, WORLD))
        dp.backward(loss * (float("inf") if rank == 1 else 1.0))
        ok, _ = dp.step(1e-3)
        results["overflow"] = {"ok": bool(ok), "unchanged": all(torch.equal(a, b) for a, b in zip(before, _params(dp))),
                               "skipped": int(dp.num_skipped_steps.item())}
        # Resume: save after SPLIT steps (state gathered on rank 0), rebuild, load on both ranks, go on.
        cfg = make_cfg(world_size=WORLD)
        dp = apply_data_parallel(tiny_model(seed=0), cfg, dist)
        _run(dp, cfg, rank, WORLD, 0, SPLIT)
        weights = {k: v.clone() for k, v in dp.unwrapped.state_dict().items()}
        state = dp.state_dict()
        obj = [state]
        torch.distributed.broadcast_object_list(obj, src=0)  # stands in for "every rank reads rank 0's file"
        results["rank_state_is_none"] = state["optimizer"] is None
        resumed_model = tiny_model(seed=99)
        resumed_model.load_state_dict(weights)
        resumed = apply_data_parallel(resumed_model, cfg, dist)
        resumed.load_state_dict(obj[0])
        losses, _, _ = _run(resumed, cfg, rank, WORLD, SPLIT, STEPS - SPLIT)
        results["resumed"] = {"params": _params(resumed), "losses": losses}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        del dp, resumed  # DDP reducers hold the process group: free them before it goes
        gc.collect()
        torch.distributed.barrier()  # no rank tears down while the other still communicates
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    cfg = make_cfg(world_size=1)
    single = apply_data_parallel(tiny_model(seed=0), cfg, cpu_dist())
    single_losses, _, single_norm = _run(single, cfg, 0, 1, 0, STEPS)
    expected = _params(single)

    for res in ranks:
        for key in ("sharded=True", "sharded=False"):
            assert res[key]["ok"]
            assert abs(res[key]["norm"] - single_norm) <= 1e-5 * single_norm
            for got, want in zip(res[key]["params"], expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert res["sharded=True"]["zero"] == "ZeroRedundancyOptimizer"
        assert res["sharded=False"]["zero"] == "AdamW"
    # Both ranks hold bit-identical parameters.
    for a, b in zip(ranks[0]["sharded=True"]["params"], ranks[1]["sharded=True"]["params"]):
        assert torch.equal(a, b)
    assert [r["overflow"] for r in ranks] == [{"ok": False, "unchanged": True, "skipped": 1}] * WORLD
    # Only rank 0's state is complete.
    assert [r["rank_state_is_none"] for r in ranks] == [False, True]
    # Resume on 2 ranks is bit-exact against the uninterrupted 2-rank run.
    for res in ranks:
        for got, want in zip(res["resumed"]["params"], res["sharded=True"]["params"]):
            assert torch.equal(got, want)
    assert len(single_losses) == STEPS
