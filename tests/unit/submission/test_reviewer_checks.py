"""What a results reviewer catches, on a real (tiny) offline-evaluated run: every edit is refused before anything
is written, in one error naming the run directory and the file; the final log has the real results' layout.

One run is trained (eval.inline=false, 6 collected checkpoints) and scored with a stand-in for FID/CLIP (fail,
fail, pass); three copies with their own seeds make a rehearsal submission whose logs, configs, scores.jsonl and
eval_checkpoints/index.jsonl agree. Each test spoils one thing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sd_mlperf.submission import PackagingError, package_runs
from sd_mlperf.submission.runs import check_runs
from sd_mlperf.training.eval_checkpoints import read_index
from sd_mlperf.training.offline_eval import RunEvaluation
from tests.unit.submission._helpers import ORG, SYSTEM, write_system_config
from tests.unit.submission.test_real_results import RESULTS, phases
from tests.unit.training._helpers import make_batches, make_cfg, make_trainer

PASS, FAIL = (80.0, 0.2), (120.0, 0.1)
SEED = 1234


def _events(path: Path) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines() if ":::MLLOG" in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run trained with offline evaluation, scored (first pass at the third checkpoint), final log written."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("reviewed")
    cfg = make_cfg(tmp, "eval.inline=false", "checkpoint.resumable=false", "training.max_steps=12",
                   "training.checkpoint_every_samples=4", "run.division=open", f"run.submission_org={ORG}",
                   f"run.submission_platform={SYSTEM}", f"run.seed={SEED}")
    trainer, _ = make_trainer(cfg, make_batches(3))
    trainer.fit()
    trainer.close()
    run = tmp / "run"
    steps = [r["step"] for r in read_index(run)[0]]
    runner = RunEvaluation(run, evaluate=lambda p: PASS if steps.index(p["step"]) >= 2 else FAIL, num_prompts=30000,
                           noise_seed=0, target_fid=90.0, target_clip=0.15, is_main=True, final_num_prompts=30000)
    runner.score_all(runner.collected()[0])
    runner.write_final_log(run / "mlperf.log")
    torch.set_num_threads(before)
    return run


def _reseed(run: Path, seed: int) -> None:
    """Another run of the same training: the seed in its config.yaml and its log."""
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.run.seed = seed
    OmegaConf.save(cfg, run / "config.yaml")
    _edit_log(run / "mlperf.log", "seed", lambda e: e.update(value=seed))


@pytest.fixture
def runs(trained, tmp_path) -> list[Path]:
    out = []
    for i in range(3):
        run = Path(shutil.copytree(trained, tmp_path / "runs" / f"run{i}"))
        _reseed(run, SEED + i)
        out.append(run)
    return out


def _edit_log(log: Path, key: str, edit) -> None:
    """Apply edit(event) to every event of `key` in the log, keeping the line format."""
    lines = []
    for line in log.read_text().splitlines():
        if f'"key": "{key}"' in line:
            prefix, body = line.split(":::MLLOG ", 1)
            event = json.loads(body)
            edit(event)
            line = f"{prefix}:::MLLOG {json.dumps(event)}"
        lines.append(line)
    log.write_text("\n".join(lines) + "\n")


def _edit_config(run: Path, key: str, value) -> None:
    cfg = OmegaConf.load(run / "config.yaml")
    OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, run / "config.yaml")


def _problems(runs: list[Path]) -> str:
    return "\n".join(check_runs(runs, required=10, allow_count_mismatch=True)[1])


def test_our_final_log_is_laid_out_as_the_real_results(trained):
    ours = _events(trained / "mlperf.log")
    real = _events(RESULTS / "result_0.txt")
    assert phases(ours) == phases(real) == ["training", "evaluation", "run_stop"]
    evaluation = [e["key"] for e in ours if e["key"].startswith(("eval_start", "eval_accuracy", "eval_stop"))]
    assert evaluation == [e["key"] for e in real if e["key"] in ("eval_start", "eval_accuracy", "eval_stop")]
    assert {"status", "step_num"} <= set(ours[-1]["metadata"]) and "samples_count" in ours[-1]["metadata"]
    assert {"status", "step_num"} <= set(real[-1]["metadata"])
    # Training went on after the first passing checkpoint (samples 12): its blocks stay, as in the real logs.
    assert max(e["metadata"]["samples_count"] for e in ours if e["key"] == "block_stop") == 24
    assert ours[-1]["time_ms"] < max(e["time_ms"] for e in ours if e["key"] == "block_stop")


def test_untouched_runs_pass_every_reviewer_check(runs):
    assert _problems(runs) == ""


def test_an_edit_is_refused_before_anything_is_written(runs, tmp_path):
    _edit_log(runs[1] / "mlperf.log", "eval_accuracy",
              lambda e: e.update(value=70.0) if e["metadata"]["metric"] == "FID" else None)
    out = tmp_path / "out"
    with pytest.raises(PackagingError) as excinfo:
        package_runs(runs, out, write_system_config(tmp_path / "system.yaml"), allow_run_count_mismatch=True)
    assert f"{runs[1]}: mlperf.log's evaluation at samples_count 4 (CLIP 0.1, FID 70.0) is none that " \
        "eval_offline/scores.jsonl recorded (FID 120.0 CLIP 0.1)" in str(excinfo.value)
    assert not (out / ORG).exists()


def test_an_eval_line_of_no_recorded_score_is_refused(runs):
    _edit_log(runs[0] / "mlperf.log", "eval_accuracy", lambda e: e["metadata"].update(samples_count=20))
    assert f"{runs[0]}: mlperf.log has an evaluation at samples_count 20 that eval_offline/scores.jsonl never" \
        in _problems(runs)


def test_a_moved_run_stop_is_refused(runs):
    _edit_log(runs[2] / "mlperf.log", "run_stop", lambda e: e.update(time_ms=e["time_ms"] - 5000))
    _edit_log(runs[0] / "mlperf.log", "run_stop", lambda e: e["metadata"].update(samples_count=24))
    problems = _problems(runs)
    assert f"{runs[2]}: run_stop is at" in problems and "eval_checkpoints/index.jsonl" in problems
    assert f"{runs[0]}: run_stop's samples_count is 24, not 12" in problems


@pytest.mark.parametrize("key, value, log_key", [
    ("optim.warmup_steps", 3, "opt_learning_rate_warmup_steps"),
    ("optim.base_lr_per_sample", 1e-3, "opt_base_learning_rate"),
    ("optim.weight_decay", 0.1, "opt_adamw_weight_decay"),
])
def test_a_log_that_is_not_its_configs_is_refused(runs, key, value, log_key):
    _edit_config(runs[1], key, value)
    problems = _problems(runs)
    assert f"{runs[1]}: mlperf.log's {log_key} is" in problems and "config.yaml gives" in problems


@pytest.mark.parametrize("key, value", [("model.unet.model_channels", 16), ("data.image_size", 32),
                                        ("training.micro_batch_size", 4)])
def test_runs_of_another_training_are_refused(runs, key, value):
    _edit_config(runs[2], key, value)
    if key == "training.micro_batch_size":  # the log must still match its config: a consistent, other run
        _edit_log(runs[2] / "mlperf.log", "global_batch_size", lambda e: e.update(value=4))
        _edit_log(runs[2] / "mlperf.log", "opt_base_learning_rate", lambda e: e.update(value=5e-4 * 4))
    problems = _problems(runs)
    assert f"{runs[2]}: trained with another config than {runs[0]}" in problems


def test_a_closed_label_needs_a_closed_config_that_keeps_the_rules(runs):
    for run in runs:
        _edit_log(run / "mlperf.log", "submission_division", lambda e: e.update(value="closed"))
    assert f"{runs[0]}: mlperf.log says submission_division closed but config.yaml has run.division=open" \
        in _problems(runs)
    _edit_config(runs[1], "run.division", "closed")
    assert f"{runs[1]}: config.yaml breaks the closed division: invalid value for 'model.unet.model_channels'" \
        in _problems(runs)


def test_duplicate_seeds_name_both_runs(runs):
    _reseed(runs[2], SEED)
    assert f"seed {SEED} is logged by {runs[0]} and {runs[2]}" in _problems(runs)
