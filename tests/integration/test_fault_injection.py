"""Fault injection on the timed-run path, on the CPU: kill -9, Ctrl-C, a full disk, edited files and reruns.

Tiny smoke runs (eval.inline=false, a checkpoint every 2 steps) share one prepared data directory. Training
runs that are killed run as `sd-mlperf train` subprocesses; evaluation and refusals run in-process
(sd_mlperf.cli.main). What survives what is listed in README.md, "What survives what".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_mlperf.cli import main
from sd_mlperf.training.eval_checkpoints import read_index
from sd_mlperf.training.final_log import parse_mllog_line
from sd_mlperf.training.mlperf_log import RESUMED_KEY

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAST = ["eval.inline=false", "training.checkpoint_every_samples=8", "data.synthetic.num_train_samples=16",
        "data.synthetic.num_train_shards=2", "data.synthetic.num_val_prompts=4", "eval.num_prompts=4",
        "eval.ddim_steps=2", "eval.num_grid_images=2", "logging.interval_steps=1", "logging.progress_bar=off",
        "checkpoint.export_ldm_weights=false"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A folder for the runs and the data directory they share (prepared by the first run)."""
    return tmp_path_factory.mktemp("faults")


def _args(space: Path, name: str, *more: str, out: Path | None = None) -> list[str]:
    return ["train", "--config", str(REPO / "conf" / "smoke.yaml"), f"run.output_dir={out or space}",
            f"run.name={name}", f"data.synthetic_dir={space / 'data'}", *FAST, *more]


@pytest.fixture(scope="module")
def base(space):
    """A finished run of 4 steps: two collected checkpoints, the training end recorded."""
    assert main(_args(space, "base", "training.max_steps=4")) == 0
    return space / "base"


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "sd_mlperf", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=ENV, cwd=REPO)


def _wait_for(what, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not what():
        assert proc.poll() is None, f"the trainer ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def _events(path: Path) -> list[dict]:
    return [e for e in (parse_mllog_line(line) for line in path.read_text().splitlines()) if e]


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_kill_9_watch_resume_ctrl_c_then_the_final_log(space, base, capsys):
    """kill -9 mid-run; --watch notices the dead trainer; a resume completes the collection; Ctrl-C ends it as
    interrupted; evaluation stitches the two log pieces into a final log that still says resumed."""
    run, log = space / "killed", space / "killed.out"
    trainer = _spawn(_args(space, "killed", "training.max_steps=100000"), log)
    _wait_for(lambda: len(read_index(run)[0]) >= 2, trainer, log)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    collected, end = read_index(run)
    assert end is None  # killed: no end recorded

    # --watch: scores what is there (an unreachable target: none passes), then sees that the trainer is gone.
    assert main(["evaluate", "--run-dir", str(run), "--watch", "--poll-s", "0.1", "--watch-timeout-s", "60",
                 "--num-prompts", "2", "training.target_fid=-1"]) == 1
    line = _last_error(capsys)
    assert f"pid {trainer.pid} on this host) is gone without recording the end of training" in line, line

    # The resume (auto, open division) continues from the newest checkpoint and collects what the kill lost.
    resumed = _spawn(_args(space, "killed", "training.max_steps=100000"), log)
    _wait_for(lambda: any(r["step"] > collected[-1]["step"] + 2 for r in read_index(run)[0]), resumed, log)
    resumed.send_signal(signal.SIGINT)
    assert resumed.wait(60) == 130, log.read_text()[-3000:]
    assert "interrupted (Ctrl-C)" in log.read_text()
    records, end = read_index(run)
    assert end["reason"] == "interrupted"
    steps = [r["step"] for r in records]
    assert steps == list(range(2, steps[-1] + 1, 2))  # every block end collected, none twice
    assert not list(run.rglob(".*.tmp")) and not list((run / "checkpoints").glob(".step_*"))
    on_disk = sorted(p.name for p in (run / "eval_checkpoints").glob("step_*.pt"))
    assert on_disk == sorted(r["file"] for r in records)

    # The final log of the resumed run: both pieces stitched, marked resumed (huge target: the first passes).
    assert main(["evaluate", "--run-dir", str(run), "--all", "training.target_fid=1e9", "training.target_clip=-1"]) == 1
    out = capsys.readouterr().out
    assert "no final log written" not in out and "one evaluation" in out  # the first checkpoint passes: lonely
    events = _events(run / "mlperf.log")
    keys = [e["key"] for e in events]
    assert keys.count("run_start") == 1 and keys.count(RESUMED_KEY) == 1 and keys[-1] == "run_stop"

    # The summary counts what the training end recorded, not the last progress record.
    assert main(["report", str(run)]) == 0
    summary = capsys.readouterr().out
    assert f"{end['samples_count']:,} trained" in summary and "training_end (interrupted)" in summary


def test_reruns_edits_and_a_second_evaluator_on_a_finished_run(space, base, tmp_path, capsys):
    scores = base / "eval_offline" / "scores.jsonl"
    evaluate = ["evaluate", "--run-dir", str(base), "--all"]

    assert main(evaluate) == 1  # random weights: not converged, but the final log is written
    assert len(scores.read_text().splitlines()) == 2 and (base / "mlperf.log").is_file()
    assert main(evaluate) == 1
    assert len(scores.read_text().splitlines()) == 2  # cached
    with open(scores, "a") as f:  # an evaluator killed mid-append: the next append cuts the torn line
        f.write('{"step": 2, "fid"')
    assert main([*evaluate, "eval.ddim_steps=4"]) == 1
    lines = scores.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x) for x in lines)  # another setting: scored again
    capsys.readouterr()

    # A second evaluator is refused while the first holds the lock; a dead holder's lock is reported stale.
    lock = base / "eval_offline" / "evaluate.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "time": time.time()}))
    assert main(evaluate) == 1 and f"another `sd-mlperf evaluate --run-dir` holds {lock}" in _last_error(capsys)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "time": time.time()}))
    assert main(evaluate) == 1 and f"stale lock {lock}" in (line := _last_error(capsys)) and f"rm {lock}" in line
    lock.unlink()

    # An edited score file: the damaged line is named with its number.
    scores.write_text(scores.read_text().replace(lines[1], "garbage", 1))
    assert main(evaluate) == 1 and f"{scores}:2: not a JSON record" in _last_error(capsys)

    # A truncated collected checkpoint is refused by its checksum, naming the file.
    copy = tmp_path / "copy"
    shutil.copytree(base, copy, ignore=shutil.ignore_patterns("eval_offline"))
    ckpt = copy / "eval_checkpoints" / "step_0000004.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-1000])
    assert main(["evaluate", "--run-dir", str(copy), "--all"]) == 1
    assert f"evaluation checkpoint {ckpt} (indexed in" in (line := _last_error(capsys)) and "truncated" in line

    # evaluate --checkpoint on a collected checkpoint: its step and samples, its output in its own run.
    assert main(["evaluate", "--checkpoint", str(base / "eval_checkpoints" / "step_0000002.pt"),
                 "--config", str(base / "config.yaml")]) == 0
    assert "step 2 samples 8 FID" in capsys.readouterr().out
    assert (base / "eval_offline" / "step_0000002.json").is_file()

    # One run per directory: a fresh start in it is refused, naming the fix.
    assert main(_args(space, "base", "training.resume=never", "training.max_steps=4")) == 1
    assert "already holds an earlier run" in (line := _last_error(capsys)) and "set run.name" in line


def test_a_full_disk_is_named_and_the_training_end_says_error(space, base, capsys):
    mount = space / "small_disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"mounting a 20 MB tmpfs needs root (CAP_SYS_ADMIN): {made.stderr.decode().strip()}")
    try:
        # Weights-only collection every 2 steps (6.4 MB each) fills 20 MB within a few blocks.
        args = _args(space, "full", "training.max_steps=40", "checkpoint.resumable=false", out=mount)
        assert main(args) == 1
        line = _last_error(capsys)
        assert ("UserError: No space left on device: writing evaluation checkpoint "
                f"{mount}/full/eval_checkpoints/step_") in line, line
        assert read_index(mount / "full")[1]["reason"] == "error"
        assert not list((mount / "full").rglob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_run_directory_is_refused_before_any_scoring(space, base, capsys):
    view = space / "read_only_view"
    view.mkdir()
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(base), str(view)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"a read-only bind mount needs root (CAP_SYS_ADMIN): {made.stderr.decode().strip()}")
    try:
        if subprocess.run(["touch", str(view / "probe")], capture_output=True).returncode == 0:
            (view / "probe").unlink()
            pytest.skip("this kernel ignored the read-only flag of the bind mount")
        assert main(["evaluate", "--run-dir", str(view), "--all"]) == 1
        line = _last_error(capsys)
        assert f"cannot write into {view}" in line and "Read-only file system" in line, line
        assert "eval step" not in capsys.readouterr().err  # nothing was scored
    finally:
        subprocess.run(["umount", str(view)], check=True)
