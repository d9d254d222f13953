"""eval.inline=false: the trainer collects weights-only checkpoints, writes no run_stop, and stops on RUN/STOP."""

from __future__ import annotations

import json

import pytest
import torch

from sd_mlperf.training.eval_checkpoints import (
    EVAL_CHECKPOINT_DIR,
    INDEX_FILE,
    EvalCheckpointWriter,
    read_index,
    request_stop,
    stop_requested,
)
from sd_mlperf.training.mlperf_log import TRAINING_LOG_FILE
from tests.unit.training._helpers import make_batches, make_cfg, make_trainer

OFFLINE = ["eval.inline=false", "checkpoint.resumable=false", "training.max_steps=9"]


def _keys(path):
    return [json.loads(line.split(":::MLLOG ", 1)[1])["key"] for line in path.read_text().splitlines()]


def test_offline_run_collects_every_block_and_leaves_run_stop_to_the_evaluator(tmp_path):
    cfg = make_cfg(tmp_path, *OFFLINE)
    trainer, _ = make_trainer(cfg, make_batches(3))
    state = trainer.fit()
    trainer.close()
    run = tmp_path / "run"
    records, end = read_index(run)
    assert [(r["step"], r["samples_count"]) for r in records] == [(3, 6), (6, 12), (9, 18)]
    assert end is not None and end["reason"] == "max_steps" and end["samples_count"] == 18
    assert all(a["collected_ms"] <= b["collected_ms"] for a, b in zip(records, records[1:]))
    payload = torch.load(run / EVAL_CHECKPOINT_DIR / records[-1]["file"], weights_only=True)
    assert payload["step"] == 9 and payload["seed"] == 1234 and payload["global_batch_size"] == 2
    final = trainer.dp.unwrapped.state_dict()
    assert all(torch.equal(payload["unet"][k], final[k]) for k in final)
    earlier = torch.load(run / EVAL_CHECKPOINT_DIR / records[0]["file"], weights_only=True)
    assert not all(torch.equal(earlier["unet"][k], final[k]) for k in final)  # a copy, not a view of the weights
    keys = _keys(run / TRAINING_LOG_FILE)
    assert "run_stop" not in keys and keys.count("block_stop") == 3
    assert not (run / cfg.logging.mlperf_log_file).exists()  # the final log is the evaluator's to write
    assert not (run / "checkpoints").exists()  # checkpoint.resumable=false
    assert state.step == 9


def test_stop_file_ends_training_at_the_next_block(tmp_path):
    cfg = make_cfg(tmp_path, *OFFLINE)
    trainer, _ = make_trainer(cfg, make_batches(3))
    collect = trainer.collector.collect

    def collect_then_stop(step, *args, **kwargs):
        collect(step, *args, **kwargs)
        if step == 3:
            request_stop(tmp_path / "run", "test: target reached")

    trainer.collector.collect = collect_then_stop
    state = trainer.fit()
    trainer.close()
    records, end = read_index(tmp_path / "run")
    assert state.step == 3 and [r["step"] for r in records] == [3]
    assert end["reason"] == "stop_requested"


def test_a_fresh_run_removes_a_stale_stop_file(tmp_path):
    cfg = make_cfg(tmp_path, *OFFLINE, "training.max_steps=3")
    request_stop(tmp_path / "run", "left by an earlier run")
    trainer, _ = make_trainer(cfg, make_batches(3))
    assert not stop_requested(tmp_path / "run")
    trainer.fit()
    trainer.close()
    assert read_index(tmp_path / "run")[1]["reason"] == "max_steps"


def test_writer_publishes_complete_files_and_raises_a_failed_write(tmp_path):
    writer = EvalCheckpointWriter(tmp_path, enabled=True, background=True)
    writer.collect(1, 4, {"w": torch.ones(2)}, global_batch_size=4, seed=7)
    writer.finish(4, "max_steps")
    records, end = read_index(tmp_path)
    assert [r["file"] for r in records] == ["step_0000001.pt"] and end["reason"] == "max_steps"
    assert not [p for p in (tmp_path / EVAL_CHECKPOINT_DIR).iterdir() if p.name.endswith(".tmp")]

    broken = EvalCheckpointWriter(tmp_path / "b", enabled=True, background=True)
    broken.collect(1, 4, {"w": torch.ones(2)}, global_batch_size=4, seed=7)
    broken.wait()
    broken._write = lambda payload: (_ for _ in ()).throw(OSError("disk full"))  # the next write fails
    broken.collect(2, 8, {"w": torch.ones(2)}, global_batch_size=4, seed=7)
    with pytest.raises(RuntimeError, match="disk full"):
        broken.finish(8, "max_steps")
    assert read_index(tmp_path / "b")[1]["reason"] == "error"  # never recorded as a normal end


def test_read_index_ignores_a_partial_last_line(tmp_path):
    index = tmp_path / EVAL_CHECKPOINT_DIR / INDEX_FILE
    index.parent.mkdir()
    index.write_text('{"step": 2, "samples_count": 8, "collected_ms": 5, "file": "step_0000002.pt"}\n{"step": 4, "sa')
    records, end = read_index(tmp_path)
    assert [r["step"] for r in records] == [2] and end is None


def test_disabled_writer_on_other_ranks_writes_nothing(tmp_path):
    writer = EvalCheckpointWriter(tmp_path, enabled=False)
    writer.collect(1, 4, {"w": torch.ones(2)}, global_batch_size=4, seed=7)
    writer.finish(4, "max_steps")
    assert not (tmp_path / EVAL_CHECKPOINT_DIR).exists()
