"""build_trainer's seams: the backends line logged once and short, and its evaluator default a typed marker."""

from __future__ import annotations

import logging

import yaml
from _helpers import FakeEvaluator, make_batches, make_cfg, make_trainer

from sd_mlperf.training.build import FROM_CONFIG, FromConfig, build_trainer


def test_the_backends_line_is_logged_once_short_and_names_the_file_with_reasons(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="sd_mlperf"):
        trainer, _ = make_trainer(make_cfg(tmp_path), make_batches(2))
    trainer.close()
    lines = [r.getMessage() for r in caplog.records if "backends:" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(lines) == 1, lines
    path = trainer.run_dir / "resolved_backends.yaml"
    assert lines[0].startswith("backends: attention=") and "parallel=torch" in lines[0] and str(path) in lines[0]
    assert len(lines[0]) - len(str(path)) < 120, lines[0]
    why = yaml.safe_load(path.read_text())
    assert set(why) == {"attention", "norm", "parallel"} and all(v["why"] for v in why.values())


def test_the_evaluator_default_is_a_typed_marker(tmp_path):
    assert isinstance(FROM_CONFIG, FromConfig)
    assert build_trainer.__kwdefaults__["evaluator"] is FROM_CONFIG
    evaluator = FakeEvaluator([(1.0, 1.0)])
    trainer, _ = make_trainer(make_cfg(tmp_path), make_batches(2), evaluator)
    trainer.close()
    assert trainer.evaluator is evaluator
