"""Ten tiny timed runs -> offline evaluation as the rules require -> `sd-mlperf package` -> the official checkers.

The runs are real trainings (the tiny UNet, in-memory latents, eval.inline=false, seeds drawn from the OS),
each collecting 6 weights-only checkpoints. FID/CLIP of a checkpoint come from a stand-in (the real evaluator
cannot reach the target with tiny random models) that makes run i converge at checkpoint 2 + i % 3, so the runs
converge at different points. Run 0 is scored with `all` (every checkpoint up to the first passing one, as the
rules ask of 1 run), the other 9 with `last_two` (the first passing one and the one before it). Then the package
command validates, writes the submission layout and runs mlperf-logging's package checker, RCP checker, seed
checker and result summarizer: every enforced one must pass with no error. (The RCP checker reports the missing
RCP for a global batch of 2; it is not enforced in the open division, the only one tiny runs can belong to.)
"""

from __future__ import annotations

import json

import pytest

from sd_mlperf.cli import main
from sd_mlperf.training.eval_checkpoints import read_index
from sd_mlperf.training.final_log import parse_mllog_line
from sd_mlperf.training.offline_eval import RunEvaluation
from tests.unit.submission._helpers import ORG, SYSTEM, write_system_config
from tests.unit.training._helpers import make_batches, make_cfg, make_trainer

PASS, FAIL = (80.0, 0.2), (120.0, 0.1)
OFFLINE = ["eval.inline=false", "checkpoint.resumable=false", "training.max_steps=12",
           "training.checkpoint_every_samples=4", "run.seed=null", f"run.submission_org={ORG}",
           f"run.submission_platform={SYSTEM}"]


def _train(tmp_path, i):
    cfg = make_cfg(tmp_path, *OFFLINE, f"run.name=run_{i}")
    trainer, _ = make_trainer(cfg, make_batches(3, seed=i))
    trainer.fit()
    trainer.close()
    return tmp_path / f"run_{i}"


def _evaluate_offline(run_dir, converge_at, strategy):
    steps = [r["step"] for r in read_index(run_dir)[0]]
    scored = []

    def evaluate(payload):  # stand-in for FID/CLIP
        scored.append(payload["step"])
        return PASS if steps.index(payload["step"]) >= converge_at else FAIL

    runner = RunEvaluation(run_dir, evaluate=evaluate, num_prompts=30000, noise_seed=0, target_fid=90.0,
                           target_clip=0.15, is_main=True, final_num_prompts=30000)
    records, _ = runner.collected()
    (runner.score_all if strategy == "all" else runner.score_last_two)(records)
    runner.write_final_log(run_dir / "mlperf.log")
    return scored, steps


@pytest.mark.slow
def test_ten_runs_evaluated_offline_package_and_pass_the_official_checkers(tmp_path, capsys, one_intra_op_thread):
    runs = []
    for i in range(10):
        run_dir = _train(tmp_path, i)
        converge_at = 2 + i % 3
        scored, steps = _evaluate_offline(run_dir, converge_at, "all" if i == 0 else "last_two")
        if i == 0:
            assert scored == steps[: converge_at + 1]
        assert {steps[converge_at - 1], steps[converge_at]} <= set(scored)
        runs.append((run_dir, steps[converge_at] * 2))  # samples_count: 2 samples per step

    system = write_system_config(tmp_path / "system.yaml")
    out = tmp_path / "submission"
    status = main(["package", *[str(r) for r, _ in runs], "--out", str(out), "--system-config", str(system)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    summary = json.loads((out / "package_summary.json").read_text())
    assert summary["passed"] and summary["division"] == "open"
    assert {v["name"]: v["failed"] for v in summary["verdicts"]} == dict.fromkeys(
        [v["name"] for v in summary["verdicts"]], False)
    verdicts = {v["name"]: v for v in summary["verdicts"]}
    assert all(v["passed"] for name, v in verdicts.items() if "rcp" not in name.lower()), verdicts
    assert [r["samples_to_target"] for r in summary["runs"]] == [samples for _, samples in runs]
    assert len({r["seed"] for r in summary["runs"]}) == 10  # drawn from the OS, one per run
    checker_log = (out / "package_checker.log").read_text()
    assert "PACKAGE CHECKER FOUND NO ERRORS" in checker_log and "ERROR -" not in checker_log
    # Each packaged log stops the clock at its first passing checkpoint's collection.
    for i, (run_dir, samples) in enumerate(runs):
        events = [e for e in map(parse_mllog_line, (out / ORG / "results" / SYSTEM / "stable_diffusion" /
                                                     f"result_{i}.txt").read_text().splitlines()) if e]
        stop = events[-1]
        assert stop["key"] == "run_stop" and stop["metadata"]["status"] == "success"
        collected = {r["samples_count"]: r["collected_ms"] for r in read_index(run_dir)[0]}
        assert stop["metadata"]["samples_count"] == samples and stop["time_ms"] == collected[samples]
