"""What makes a timed run valid: its own seed, its own directory, no silent resume, an honest cache_clear."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sd_mlperf.training.mlperf_log import CACHE_CLEARED_ENV, RESUMED_KEY
from tests.unit.training._helpers import make_batches, make_cfg, make_trainer, record_losses

RUN = ["training.max_steps=3", "training.checkpoint_every_samples=6"]


def _events(path):
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines()]


def _train(cfg):
    trainer, _ = make_trainer(cfg, make_batches(3))
    losses = record_losses(trainer)
    trainer.fit()
    trainer.close()
    return trainer, losses


def test_null_seeds_are_drawn_per_run_and_pass_the_seed_checker(tmp_path):
    from mlperf_logging.package_checker.seed_checker import SeedChecker

    logs, seeds = [], []
    for name in ("a", "b"):
        cfg = make_cfg(tmp_path, *RUN, "run.seed=null", f"run.name={name}")
        trainer, _ = _train(cfg)
        log = tmp_path / name / cfg.logging.mlperf_log_file
        logged = [e["value"] for e in _events(log) if e["key"] == "seed"]
        assert logged == [trainer.plan.seed] and 0 <= logged[0] < 2**32
        saved = json.dumps(yaml_seed(tmp_path / name / "config.yaml"))
        assert saved == str(logged[0])  # config.yaml records the drawn seed: offline evaluation reads it there
        logs.append(str(log))
        seeds.append(logged[0])
    assert seeds[0] != seeds[1]
    assert SeedChecker("5.0.0").check_seeds(logs)
    # The same seed logged on the same line twice is what the checker refuses.
    dup = tmp_path / "dup.log"
    dup.write_text((tmp_path / "a" / "mlperf.log").read_text())
    assert not SeedChecker("5.0.0").check_seeds([logs[0], str(dup)])


def yaml_seed(path):
    from omegaconf import OmegaConf

    return OmegaConf.load(path).run.seed


def test_an_explicit_seed_reproduces_a_run_bit_for_bit(tmp_path):
    first, losses_a = _train(make_cfg(tmp_path, *RUN, "run.seed=77", "run.name=a"))
    second, losses_b = _train(make_cfg(tmp_path, *RUN, "run.seed=77", "run.name=b"))
    other, losses_c = _train(make_cfg(tmp_path, *RUN, "run.seed=78", "run.name=c"))
    assert losses_a == losses_b and losses_a != losses_c
    a, b = first.dp.unwrapped.state_dict(), second.dp.unwrapped.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _closed(cfg):
    # Tiny models cannot pass the closed-division rules; this builds the run-directory check's input directly.
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, division="closed"))


def test_closed_division_refuses_a_used_run_directory_and_marks_a_resume_by_path(tmp_path):
    cfg = make_cfg(tmp_path, *RUN)
    _train(_closed(cfg))
    for resume in ("auto", "never"):
        again = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, resume=resume))
        with pytest.raises(ValueError, match="already holds an earlier run.*set run.name"):
            make_trainer(_closed(again), make_batches(3))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000003"
    by_path = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, resume=str(checkpoint),
                                                                    max_steps=6))
    trainer, _ = _train(_closed(by_path))
    marks = [e for e in _events(tmp_path / "run" / "mlperf.log") if e["key"] == RESUMED_KEY]
    assert len(marks) == 1 and marks[0]["value"] == str(checkpoint) and marks[0]["metadata"]["samples_count"] == 6
    assert trainer.plan.seed == 1234


def test_a_resumed_run_keeps_the_drawn_seed(tmp_path):
    cfg = make_cfg(tmp_path, *RUN, "run.seed=null")
    first, _ = _train(cfg)
    again = make_cfg(tmp_path, "training.max_steps=6", "training.checkpoint_every_samples=6", "run.seed=null")
    second, _ = _train(again)
    assert second.plan.seed == first.plan.seed and second.state.step == 6


@pytest.mark.parametrize("value, logged", [("1", True), (None, False), ("0", False)])
def test_cache_clear_says_what_the_launcher_did(tmp_path, monkeypatch, value, logged):
    if value is None:
        monkeypatch.delenv(CACHE_CLEARED_ENV, raising=False)
    else:
        monkeypatch.setenv(CACHE_CLEARED_ENV, value)
    cfg = make_cfg(tmp_path, "training.max_steps=1")
    trainer, _ = make_trainer(cfg, make_batches(1))
    trainer.close()
    values = [e["value"] for e in _events(tmp_path / "run" / "mlperf.log") if e["key"] == "cache_clear"]
    assert values == [logged]


def test_every_division_refuses_a_fresh_run_in_a_used_run_directory(tmp_path):
    cfg = make_cfg(tmp_path, *RUN, "eval.inline=false")  # the open division (smoke)
    _train(cfg)
    never = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, resume="never"))
    with pytest.raises(ValueError, match="already holds an earlier run.*training.resume=never would start a new one"):
        make_trainer(never, make_batches(3))
    # auto with a checkpoint resumes (open division); auto without one would start afresh: refused too.
    resumed, _ = make_trainer(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=6)),
                              make_batches(3))
    assert resumed.state.step == 3
    resumed.close()
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(ValueError, match="already holds an earlier run.*eval_checkpoints"):
        make_trainer(cfg, make_batches(3))
