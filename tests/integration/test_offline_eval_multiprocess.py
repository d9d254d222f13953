"""Offline evaluation on 2 gloo processes: every collective is joined by every rank, and rank 0 writes the log.

`sd-mlperf evaluate --run-dir` runs under torchrun on several GPUs; its index reads, score-file reads and the
watch timeout are rank 0's, broadcast to all. A rank that returned early while rank 0 still broadcast would hang
(NCCL) or break the connection (gloo), and no final log would be written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.multiprocess_helpers import free_port, set_torchrun_env

WORLD = 2
PASS, FAIL = (80.0, 0.2), (120.0, 0.1)


def _worker(rank: int, port: int, run_dir: str, out: str) -> None:
    from sd_mlperf.training.eval_checkpoints import read_index
    from sd_mlperf.training.offline_eval import RunEvaluation

    torch.set_num_threads(1)
    set_torchrun_env(rank, WORLD, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        steps = [r["step"] for r in read_index(run_dir)[0]]

        def evaluate(payload):  # the same verdicts on every rank, as the real evaluator's gathered metrics are
            return PASS if steps.index(payload["step"]) >= 3 else FAIL

        runner = RunEvaluation(run_dir, evaluate=evaluate, num_prompts=30000, noise_seed=0, target_fid=90.0,
                               target_clip=0.15, is_main=rank == 0, final_num_prompts=30000)
        runner.score_last_two(runner.collected()[0])
        status = runner.conclude(Path(run_dir) / "mlperf.log").exit_code
        runner.watch(poll_s=0.01, timeout_s=5)  # returns at once: a checkpoint passes
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}").write_text(str(status))


@pytest.mark.slow
def test_two_ranks_score_and_write_the_final_log(tmp_path, one_intra_op_thread):
    from tests.unit.training._helpers import make_batches, make_cfg, make_trainer

    cfg = make_cfg(tmp_path, "eval.inline=false", "checkpoint.resumable=false", "training.max_steps=12",
                   "training.checkpoint_every_samples=4")
    trainer, _ = make_trainer(cfg, make_batches(3))
    trainer.fit()
    trainer.close()
    run_dir = tmp_path / "run"
    mp.spawn(_worker, args=(free_port(), str(run_dir), str(tmp_path)), nprocs=WORLD, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(WORLD)] == ["0", "0"]
    log = (run_dir / "mlperf.log").read_text()
    assert log.count('"key": "run_stop"') == 1 and '"status": "success"' in log
    assert (run_dir / "STOP").is_file()
