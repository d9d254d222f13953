"""The real trainer on 2 gloo processes (torch DDP + ZeRO): kill-and-resume equals the uninterrupted run.

One spawned job (process start-up costs about 10 s) trains three times in one process group:
uninterrupted, killed after step 3, and resumed (training.resume=auto) from the step-2 checkpoint.
The data is an in-memory loader per rank (tests/unit/training/_helpers.py); everything else is real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.multiprocess_helpers import free_port, set_torchrun_env

WORLD = 2




def _worker(rank: int, port: int, out_dir: str) -> None:
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from sd_mlperf.training.build import build_trainer
    from tests.unit.training._helpers import ListLoader, conditioner, make_batches, make_cfg, record_losses

    torch.set_num_threads(1)
    set_torchrun_env(rank, WORLD, port)
    out = Path(out_dir)
    overrides = ["parallel.gpus_per_node=2", "training.checkpoint_every_samples=8", "training.max_steps=4"]
    batches = make_batches(4, seed=10 + rank)  # each rank its own micro-batches
    cfg = make_cfg(out / "ref", *overrides)
    dist = init_distributed(cfg.run, cfg.parallel)
    results = {}
    try:
        def run(cfg, fail_at=None):
            loader = ListLoader(batches)
            loader.fail_at = fail_at
            trainer = build_trainer(cfg, dist, evaluator=None, data=(loader, conditioner))
            start = trainer.state.step
            losses = record_losses(trainer)
            try:
                trainer.fit()
            except KeyboardInterrupt:
                pass
            finally:
                trainer.close()
            return start, losses, {k: v.clone() for k, v in trainer.dp.unwrapped.state_dict().items()}

        results["ref"] = run(cfg)
        cut = make_cfg(out / "cut", *overrides)
        results["killed"] = run(cut, fail_at=3)
        results["resumed"] = run(cut)
    finally:
        destroy_distributed()
    torch.save(results, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_rank_kill_and_resume_is_exact(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for res in ranks:
        start, ref_losses, ref_weights = res["ref"]
        assert start == 0 and len(ref_losses) == 4
        assert res["killed"][1] == ref_losses[:3]
        start, resumed_losses, weights = res["resumed"]
        assert start == 2 and resumed_losses == ref_losses[2:]  # bit-exact on the CPU
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    # Both ranks hold identical weights; their local losses differ (different micro-batches).
    assert all(torch.equal(ranks[0]["ref"][2][k], ranks[1]["ref"][2][k]) for k in ranks[0]["ref"][2])
    assert ranks[0]["ref"][1] != ranks[1]["ref"][1]
    ckpt = tmp_path / "cut" / "run" / "checkpoints" / "step_0000004"
    pt_files = {"model.pt", "optimizer.pt", "rank_00000.pt", "rank_00001.pt"}  # each rank's with its sha256
    assert {p.name for p in ckpt.iterdir()} == pt_files | {f"{name}.sha256" for name in pt_files}
    log = (tmp_path / "cut" / "run" / "mlperf.log").read_text()
    assert log.count('"key": "run_start"') == 1  # only rank 0 writes
