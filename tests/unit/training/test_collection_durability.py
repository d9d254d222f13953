"""Collection for offline evaluation survives kills: checksums, resume re-collects, Ctrl-C, temporaries, heartbeat."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pytest
import torch

from sd_mlperf.training.checkpoints import Checkpointer, read_checkpoint_weights
from sd_mlperf.training.eval_checkpoints import (
    EVAL_CHECKPOINT_DIR,
    HEARTBEAT_FILE,
    INDEX_FILE,
    EvalCheckpointWriter,
    load_eval_checkpoint,
    read_index,
    trainer_gone,
)
from sd_mlperf.training.mlperf_log import TRAINING_LOG_FILE
from sd_mlperf.utils.errors import UserError
from tests.unit.training._helpers import make_batches, make_cfg, make_trainer

OFFLINE = ["eval.inline=false", "training.max_steps=4", "training.checkpoint_every_samples=4"]


def _fit(cfg, **patch):
    trainer, loader = make_trainer(cfg, make_batches(3))
    for name, value in patch.items():
        setattr(trainer.collector, name, value)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer, loader


def test_a_resume_collects_again_the_step_whose_collection_a_kill_lost(tmp_path):
    cfg = make_cfg(tmp_path, *OFFLINE)
    trainer, _ = make_trainer(cfg, make_batches(3))
    collect = trainer.collector.collect
    trainer.collector.collect = lambda step, *a, **k: None if step == 4 else collect(step, *a, **k)  # "killed"
    trainer.fit()
    trainer.close()
    run = tmp_path / "run"
    assert [r["step"] for r in read_index(run)[0]] == [2]  # the resumable checkpoint of step 4 exists, its weights not
    again = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=6))
    resumed, _ = make_trainer(again, make_batches(3))
    resumed.collector.wait()
    records, end = read_index(run)
    assert [r["step"] for r in records] == [2, 4] and end is None  # the resume superseded the earlier end
    saved = torch.load(run / "checkpoints" / "step_0000004" / "model.pt", weights_only=True)["unet"]
    collected = load_eval_checkpoint(run, records[1])
    assert collected["step"] == 4 and all(torch.equal(saved[k], collected["unet"][k]) for k in saved)
    resumed.fit()
    resumed.close()
    assert [r["step"] for r in read_index(run)[0]] == [2, 4, 6]


def test_the_resumable_checkpoint_waits_until_earlier_collections_are_durable(tmp_path):
    cfg = make_cfg(tmp_path, "eval.inline=false", "training.max_steps=6", "training.checkpoint_every_samples=4")
    trainer, _ = make_trainer(cfg, make_batches(3))
    write = trainer.collector._write
    trainer.collector._write = lambda payload: (time.sleep(0.3), write(payload))  # a slow disk
    save = trainer.checkpointer.save
    seen: list[tuple[int, list[int]]] = []

    def save_and_look(step, *args, **kwargs):
        seen.append((step, [r["step"] for r in read_index(tmp_path / "run")[0]]))
        return save(step, *args, **kwargs)

    trainer.checkpointer.save = save_and_look
    trainer.fit()
    trainer.close()
    assert seen == [(2, []), (4, [2]), (6, [2, 4])]


def test_ctrl_c_records_the_end_as_interrupted_and_a_rerun_cleans_up(tmp_path):
    cfg = make_cfg(tmp_path, *OFFLINE, "training.max_steps=8")
    trainer, loader = make_trainer(cfg, make_batches(3))
    loader.fail_at = 5  # Ctrl-C while drawing the 6th batch: after step 5
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.close()
    run = tmp_path / "run"
    records, end = read_index(run)
    assert [r["step"] for r in records] == [2, 4]
    assert end["reason"] == "interrupted" and end["samples_count"] == 10
    # What a kill during a write leaves: a temporary file, and a file published but never indexed.
    folder = run / EVAL_CHECKPOINT_DIR
    (folder / ".step_0000006.pt.abc.tmp").write_bytes(b"partial")
    (folder / "step_0000006.pt").write_bytes((folder / "step_0000004.pt").read_bytes())
    (run / "checkpoints" / ".step_0000006.tmp").mkdir()
    (run / "checkpoints" / ".latest.x1y2.tmp").write_text("step_0000006\n")
    Checkpointer(cfg.checkpoint, run).recover()
    EvalCheckpointWriter(run, enabled=True, heartbeat_s=None)
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_0000002.pt", "step_0000004.pt"]
    assert not list(folder.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*"))


def test_ctrl_c_in_an_inline_run_logs_run_stop_aborted(tmp_path):
    from tests.unit.training._helpers import FakeEvaluator

    cfg = make_cfg(tmp_path, "training.max_steps=8", "training.checkpoint_every_samples=4")
    trainer, loader = make_trainer(cfg, make_batches(3), evaluator=FakeEvaluator([(120.0, 0.1)]))
    loader.fail_at = 5
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.close()
    stops = [json.loads(x.split(":::MLLOG ", 1)[1]) for x in (tmp_path / "run" / "mlperf.log").read_text().splitlines()
             if '"run_stop"' in x]
    assert len(stops) == 1 and stops[0]["metadata"]["status"] == "aborted" and stops[0]["metadata"][
        "samples_count"] == 10


def test_a_swap_cut_by_a_kill_is_put_back(tmp_path):
    cfg = make_cfg(tmp_path, "training.max_steps=2", "training.checkpoint_every_samples=4")
    _fit(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_0000002").rename(ckpts / ".step_0000002.old")  # killed between the two renames of _publish
    checkpointer = Checkpointer(cfg.checkpoint, tmp_path / "run")
    checkpointer.recover()
    assert checkpointer.latest() == ckpts / "step_0000002"


def test_index_records_a_checksum_that_catches_truncation_corruption_and_a_wrong_step(tmp_path):
    cfg = make_cfg(tmp_path, *OFFLINE)
    _fit(cfg)
    run = tmp_path / "run"
    records, _ = read_index(run)
    assert all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in records)
    path = run / EVAL_CHECKPOINT_DIR / records[0]["file"]
    good = path.read_bytes()
    assert load_eval_checkpoint(run, records[0])["step"] == 2
    path.write_bytes(good[:-100])
    with pytest.raises(UserError, match=rf"{path} .*has {len(good) - 100} bytes, {len(good)} were written"):
        load_eval_checkpoint(run, records[0])
    path.write_bytes(good[:50] + bytes([good[50] ^ 1]) + good[51:])
    with pytest.raises(UserError, match="does not match the sha256 recorded when it was written"):
        load_eval_checkpoint(run, records[0])
    path.write_bytes((run / EVAL_CHECKPOINT_DIR / records[1]["file"]).read_bytes())  # another step's file
    unchecked = {k: v for k, v in records[0].items() if k not in ("sha256", "bytes")}
    with pytest.raises(UserError, match="stores step 4, not the index's 2"):
        load_eval_checkpoint(run, unchecked)


def test_a_collected_checkpoint_read_for_evaluate_checkpoint_keeps_its_step_samples_and_run(tmp_path):
    cfg = make_cfg(tmp_path, *OFFLINE)
    _fit(cfg)
    run = tmp_path / "run"
    weights = read_checkpoint_weights(run / EVAL_CHECKPOINT_DIR / "step_0000002.pt")
    assert (weights.step, weights.samples_count, weights.run_dir) == (2, 4, run)
    assert set(weights.state) == set(torch.load(run / "checkpoints" / "step_0000004" / "model.pt",
                                                weights_only=True)["unet"])


def test_a_disk_full_collection_names_the_device_error_and_records_the_end_as_error(tmp_path, monkeypatch):
    import errno

    cfg = make_cfg(tmp_path, *OFFLINE)
    trainer, _ = make_trainer(cfg, make_batches(3))
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "collected_ms" in obj:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=rf"No space left on device: writing evaluation checkpoint {tmp_path}/run/"
                                        r"eval_checkpoints/step_0000002\.pt failed"):
        trainer.fit()
    trainer.close()
    _, end = read_index(tmp_path / "run")
    assert end["reason"] == "error"
    assert not list((tmp_path / "run" / EVAL_CHECKPOINT_DIR).glob(".*.tmp"))


def test_heartbeat_says_when_the_trainer_is_gone(tmp_path):
    import socket
    import subprocess
    import sys

    writer = EvalCheckpointWriter(tmp_path, enabled=True, heartbeat_s=0.05)
    beat = tmp_path / EVAL_CHECKPOINT_DIR / HEARTBEAT_FILE
    first = json.loads(beat.read_text())["time"]
    time.sleep(0.3)
    assert json.loads(beat.read_text())["time"] > first and trainer_gone(tmp_path) is None
    writer.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    beat.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": time.time()}))
    assert trainer_gone(tmp_path) == f"the trainer (pid {dead.pid} on this host) is gone"
    beat.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": time.time() - 500}))
    assert "has not refreshed its heartbeat for 50" in trainer_gone(tmp_path)
    beat.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": time.time()}))
    assert trainer_gone(tmp_path) is None


def test_index_resume_records_supersede_later_steps_and_the_earlier_end(tmp_path):
    index = tmp_path / EVAL_CHECKPOINT_DIR / INDEX_FILE
    index.parent.mkdir()
    lines = [{"step": 2, "file": "a"}, {"step": 4, "file": "b"}, {"event": "training_end", "samples_count": 8},
             {"event": "resume", "step": 2, "samples_count": 4}, {"step": 4, "file": "c"}]
    index.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 6, "fi')
    records, end = read_index(tmp_path)
    assert [(r["step"], r["file"]) for r in records] == [(2, "a"), (4, "c")] and end is None
    assert TRAINING_LOG_FILE  # the log's name is the trainer's (imported for the reader of this test)


def test_a_save_cut_by_ctrl_c_leaves_no_temporary(tmp_path, monkeypatch):
    import sd_mlperf.training.checkpoints as checkpoints

    cfg = make_cfg(tmp_path, "training.max_steps=2", "training.checkpoint_every_samples=4")
    trainer, _ = make_trainer(cfg, make_batches(3))
    real = checkpoints.save_file

    def interrupted(obj, path):
        if path.name == "optimizer.pt":
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(checkpoints, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.close()
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_watch_started_before_the_trainer_waits_for_its_config(tmp_path):
    import threading

    from sd_mlperf.training.eval_config import wait_for_run_config

    run = tmp_path / "run"
    with pytest.raises(UserError, match=rf"--watch: {run / 'config.yaml'} did not appear within 0 s"):
        wait_for_run_config(run, poll_s=0.01, timeout_s=0)
    late = threading.Timer(0.2, lambda: (run.mkdir(), (run / "config.yaml").write_text("run: {}\n")))
    late.start()
    start = time.monotonic()
    wait_for_run_config(run, poll_s=0.01, timeout_s=30)
    assert (run / "config.yaml").is_file() and time.monotonic() - start >= 0.15
    late.join()


def test_watch_without_a_timeout_keeps_saying_what_it_waits_for(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from sd_mlperf.training import eval_config

    run = tmp_path / "mistyped"

    def wait(timeout_s):
        clock = iter(range(0, 100_000, 100))  # each look is 100 s later
        sleeps = []

        def sleep(s):
            sleeps.append(s)
            if len(sleeps) == 7:  # the trainer starts after 7 looks
                run.mkdir()
                (run / "config.yaml").write_text("run: {}\n")

        # the module's own clock only (time.monotonic/sleep themselves stay real for everything else)
        monkeypatch.setattr(eval_config, "time", SimpleNamespace(monotonic=lambda: float(next(clock)), sleep=sleep))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sd_mlperf"):
            eval_config.wait_for_run_config(run, poll_s=30, timeout_s=timeout_s)
        assert sleeps == [5.0] * 7
        return [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]

    assert wait(None) == [f"--watch: still waiting for {run / 'config.yaml'} after {s} s: is the trainer running "
                          "with this run.output_dir/run.name? (--watch-timeout-s S gives up after S seconds)"
                          for s in (300, 600)]
    (run / "config.yaml").unlink()
    run.rmdir()
    assert wait(5000) == []  # with a timeout it gives up on its own, with the message that says so
