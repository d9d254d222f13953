"""The CLI: `config` prints and validates; errors exit non-zero with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from sd_mlperf.cli import build_parser, main

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
    import pytest

    with pytest.raises(SystemExit):
        main(["config", "--no-such-flag"])
