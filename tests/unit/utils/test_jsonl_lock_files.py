"""utils.jsonl (torn-line repair, bad-line errors), utils.lock (one holder, stale locks), utils.files' checks."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.files import check_writable, remove_stale_temporaries, write_error
from sd_mlperf.utils.jsonl import append_jsonl, read_jsonl, repair_torn_tail
from sd_mlperf.utils.lock import RunLock, process_alive


def test_append_after_a_torn_line_never_fuses_two_records(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"b": 2, "c": ')  # a writer killed mid-line
    append_jsonl(path, {"d": 4})
    assert path.read_text() == '{"a": 1}\n{"d": 4}\n'
    assert read_jsonl(path) == [{"a": 1}, {"d": 4}]
    path.write_text('{"torn": ')  # no newline at all: everything is the torn record
    assert repair_torn_tail(path) == len('{"torn": ') and path.read_text() == ""
    assert repair_torn_tail(tmp_path / "missing.jsonl") == 0


def test_a_long_torn_tail_is_found_across_read_chunks(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n' + "x" * 200_000)
    append_jsonl(path, {"b": 2})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]


def test_the_reader_skips_a_torn_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"b": 2')
    assert read_jsonl(path) == [{"a": 1}]  # the writer may be writing it right now
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: not a JSON record"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: a JSON list, not a record"):
        read_jsonl(path)


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    lock = RunLock(tmp_path / "e.lock", "evaluator").acquire()
    record = json.loads((tmp_path / "e.lock").read_text())
    assert record["pid"] == os.getpid()
    with pytest.raises(UserError, match=rf"another evaluator holds .*pid {os.getpid()} on this host"):
        RunLock(tmp_path / "e.lock", "evaluator").acquire()
    lock.release()
    assert not (tmp_path / "e.lock").exists()
    with RunLock(tmp_path / "e.lock", "evaluator"):
        assert (tmp_path / "e.lock").exists()
    assert not (tmp_path / "e.lock").exists()


def test_a_dead_holders_lock_is_reported_stale_with_the_command_that_clears_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is gone
    assert not process_alive(dead.pid) and process_alive(os.getpid())
    import socket

    (tmp_path / "e.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    with pytest.raises(UserError, match=rf"stale lock .*pid {dead.pid}.*Clear it with: rm {tmp_path / 'e.lock'}"):
        RunLock(tmp_path / "e.lock", "evaluator").acquire()


def test_a_zombie_counts_as_dead(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # exited but not reaped
        if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        __import__("time").sleep(0.01)
    assert not process_alive(child.pid)
    child.wait()


def test_write_errors_name_a_full_disk_and_the_path(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    wrapped.__cause__ = full
    msg = str(write_error(wrapped, tmp_path / "a.pt", "checkpoint file"))
    assert msg.startswith(f"No space left on device: writing checkpoint file {tmp_path / 'a.pt'} failed")
    other = str(write_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path / "b", "x"))
    assert "No space" not in other and str(tmp_path / "b") in other


def test_check_writable_writes_for_real_and_names_the_folder(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "folder", "the test")
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(UserError, match=rf"cannot write into {tmp_path} \(Read-only file system\): the test needs"):
        check_writable(tmp_path, "the test")


def test_remove_stale_temporaries_takes_files_and_folders(tmp_path):
    (tmp_path / ".a.pt.x1.tmp").write_text("partial")
    (tmp_path / ".step_1.tmp").mkdir()
    (tmp_path / "keep.pt").write_text("done")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".a.pt.x1.tmp", ".step_1.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]


def test_a_failed_mlperf_log_write_raises_naming_the_file(tmp_path, monkeypatch):
    import logging

    from sd_mlperf.training.mlperf_log import MLPerfLogger

    mlperf = MLPerfLogger(tmp_path / "mlperf.log")

    def emit_on_a_full_disk(self, record):  # as logging.FileHandler.emit handles a failed write
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            self.handleError(record)

    monkeypatch.setattr(logging.FileHandler, "emit", emit_on_a_full_disk)
    with pytest.raises(UserError, match=rf"No space left on device: writing the MLPerf log {tmp_path / 'mlperf.log'}"):
        mlperf.event("x", 1)
    mlperf.close()
