"""Logging, atomic writes and manifests."""

from __future__ import annotations

import logging

import pytest
import torch

from sd_mlperf.utils.files import atomic_path, atomic_write_text
from sd_mlperf.utils.logging import LOGGER_NAME, log_once, reset_log_once
from sd_mlperf.utils.manifest import format_manifest, read_manifest, state_dict_manifest, write_manifest


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_log_once_logs_a_key_once():
    reset_log_once()
    log = logging.getLogger(LOGGER_NAME)
    handler = _ListHandler()
    log.addHandler(handler)
    try:
        assert log_once("k", "hello")
        assert not log_once("k", "hello again")
        assert log_once("other", "different key")
    finally:
        log.removeHandler(handler)
    assert handler.messages == ["hello", "different key"]


@pytest.fixture
def restore_logger():
    """Put the package logger's level back after a test that calls setup_logging."""
    log = logging.getLogger(LOGGER_NAME)
    level = log.level
    yield log
    log.setLevel(level)


def test_setup_logging_takes_the_rank_it_is_given_not_the_environment(monkeypatch, restore_logger):
    from sd_mlperf.utils.logging import setup_logging

    monkeypatch.setenv("RANK", "3")  # ignored: the caller says which rank this is
    monkeypatch.setenv("SLURM_PROCID", "3")
    setup_logging("INFO")
    assert restore_logger.level == logging.INFO
    setup_logging("INFO", rank=1)
    assert restore_logger.level == logging.WARNING  # other ranks: warnings only
    setup_logging("DEBUG", rank=1, all_ranks=True)
    assert restore_logger.level == logging.DEBUG


def test_importing_the_package_logs_nothing():
    import subprocess
    import sys

    code = "import sd_mlperf, sd_mlperf.cli, sd_mlperf.config, sd_mlperf.backends"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "" and out.stderr == ""


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_manifest_round_trip(tmp_path):
    sd = {"a.weight": torch.zeros(3, 2), "scale": torch.zeros(()), "n": torch.zeros(1, dtype=torch.int64)}
    rows = state_dict_manifest(sd)
    assert rows == [("a.weight", (3, 2), "float32"), ("scale", (), "float32"), ("n", (1,), "int64")]
    write_manifest(tmp_path / "m.tsv", rows)
    assert read_manifest(tmp_path / "m.tsv") == rows
    assert format_manifest(rows).splitlines()[2] == "scale\t\tfloat32"


def test_manifest_reads_the_real_fixture_format(fixtures_dir):
    rows = read_manifest(fixtures_dir / "sd2_512_base_ema_keys.tsv", prefix="model.diffusion_model.")
    assert len(rows) == 686
    assert sum(torch.Size(s).numel() for _, s, _ in rows) == 865_910_724
