"""The CLI: `config` prints and validates; `--version`; user errors print one line, others their traceback."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import sd_mlperf
import sd_mlperf.commands.config as config_command
from sd_mlperf.cli import build_parser, main, package_version
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger

REPO = Path(__file__).resolve().parents[2]


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--config", str(REPO / "conf/smoke.yaml"), "training.max_steps=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["max_steps"] == 3
    assert printed["model"]["unet"]["model_channels"] == 32


def test_config_error_exits_nonzero_naming_key_and_type():
    proc = subprocess.run(
        [sys.executable, "-m", "sd_mlperf", "config", "--config", str(REPO / "conf/sd2_mlperf.yaml"),
         "optim.base_lr_per_sample=oops"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "optim.base_lr_per_sample" in proc.stderr and "Float" in proc.stderr


def test_config_strict_reports_unset_required_keys(capsys):
    assert main(["config", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "config error: these config keys are required but not set:" in err
    for key in ("model.frozen_checkpoint", "data.train_shards", "eval.prompts_file", "eval.fid_stats"):
        assert key in err


def test_config_strict_checks_the_given_files_and_overrides(capsys):
    """A complete config passes --strict; overrides that leave one key unset get that key named alone."""
    smoke = str(REPO / "conf/smoke.yaml")
    assert main(["config", "--strict", "--config", smoke]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["unet"]["model_channels"] == 32
    given = ["model.frozen_checkpoint=/c.ckpt", "data.train_shards=/shards", "eval.prompts_file=/p.tsv",
             "eval.inception_weights=/i.pth", "eval.clip_weights=/clip.bin"]
    assert main(["config", "--strict", *given]) == 2
    err = capsys.readouterr().err
    assert "required but not set: eval.fid_stats." in err and "model.frozen_checkpoint" not in err


def test_every_subcommand_has_help_and_runs_something():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description, f"subcommand {name} lacks a description"
        assert callable(p.get_default("_run"))


def test_overrides_may_follow_options(capsys):
    assert main(["config", "training.max_steps=4", "--config", str(REPO / "conf/smoke.yaml"),
                 "training.micro_batch_size=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["max_steps"] == 4 and printed["training"]["micro_batch_size"] == 2


def test_unknown_flag_is_still_an_error():
    with pytest.raises(SystemExit):
        main(["config", "--no-such-flag"])


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sd-mlperf {package_version()}"
    assert package_version() == metadata.version("sd_mlperf")
    # An uninstalled checkout (tests/gpu/run_device_checks.sh) falls back to __version__: keep the two equal.
    declared = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert declared == sd_mlperf.__version__


def test_version_falls_back_to_the_package_attribute(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert package_version() == sd_mlperf.__version__


def _failing_config_command(monkeypatch, exc: BaseException) -> None:
    def fail(args):
        raise exc

    monkeypatch.setattr(config_command, "run", fail)


def test_errors_raised_for_the_user_print_one_line(monkeypatch, capsys):
    for exc in (ValueError("training.max_steps must be positive"), FileNotFoundError("no such run: x"),
                UserError("run.device=cuda but torch sees no CUDA device")):
        _failing_config_command(monkeypatch, exc)
        assert main(["config"]) == 1
        err = capsys.readouterr().err
        assert f"{type(exc).__name__}: {exc}" in err and "Traceback" not in err


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    _failing_config_command(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(["config"])
    # Through the console entry point: Python prints the traceback and exits non-zero.
    code = ("import sys, sd_mlperf.commands.config as c\nfrom sd_mlperf.cli import main\n"
            "def boom(args):\n    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
            "c.run = boom\nsys.exit(main(['config']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "in boom" in proc.stderr and "illegal memory access" in proc.stderr


def test_only_rank_0_of_a_launch_logs_info_before_init(monkeypatch):
    levels = []
    monkeypatch.setattr(config_command, "run", lambda args: levels.append(logger.level) or 0)
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["config"]) == 0
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("MASTER_ADDR", "h0")
    assert main(["config"]) == 0
    assert levels == [logging.INFO, logging.WARNING]


def test_top_level_help_says_what_the_tool_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "Stable Diffusion v2" in text and "MLPerf Training benchmark" in text and "submission" in text
    assert "sd-mlperf train --config conf/smoke.yaml" in text  # where to start, not the module layout
