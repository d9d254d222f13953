"""Held against real MLPerf Training v5.0 Stable Diffusion results (tests/fixtures/mlperf_v5.0, see its README).

The packager's score is the official result summarizer's: the olympic mean of run_start..run_stop, times the
RCP scaling factor that the RCP checker (run by the package checker) writes beside the results. Its own numbers
must reproduce the summarizer's on real logs, and a real systems JSON must be accepted as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sd_mlperf.submission.checkers import run_rcp_checker, run_result_summarizer
from sd_mlperf.submission.package import _summarizer_verdict
from sd_mlperf.submission.runs import RunRecord, olympic_mean
from sd_mlperf.submission.system import load_system_config, system_description

REAL = Path(__file__).resolve().parents[2] / "fixtures" / "mlperf_v5.0" / "NVIDIA"
SYSTEM_ID = "nyx_n1_ngc25.04_nemo"
RESULTS = REAL / "results" / SYSTEM_ID / "stable_diffusion"
SYSTEM_JSON = REAL / "systems" / f"{SYSTEM_ID}.json"


def _events(path: Path) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines() if ":::MLLOG" in line]


def phases(events: list[dict]) -> list[str]:
    """The log as its phases in order: training, evaluations, run_stop (consecutive repeats merged)."""
    def phase(key: str) -> str:
        evaluation = key in ("eval_start", "eval_accuracy", "eval_stop")
        return "run_stop" if key == "run_stop" else "evaluation" if evaluation else "training"

    out: list[str] = []
    for e in events:
        if not out or out[-1] != phase(e["key"]):
            out.append(phase(e["key"]))
    return out


def test_real_logs_are_training_then_evaluations_then_a_back_dated_run_stop():
    for log in sorted(RESULTS.glob("result_*.txt")):
        events = _events(log)
        assert phases(events) == ["training", "evaluation", "run_stop"], log.name
        stop = events[-1]
        assert stop["metadata"]["status"] == "success" and "step_num" in stop["metadata"]
        assert stop["time_ms"] < max(e["time_ms"] for e in events if e["key"] == "block_stop")  # back-dated


@pytest.mark.slow
def test_the_packagers_score_reproduces_the_official_summarizer_on_real_logs(tmp_path):
    from mlperf_logging.compliance_checker.mlp_parser import parse_file
    from mlperf_logging.rcp_checker import rcp_checker

    tree = tmp_path / "NVIDIA"
    shutil.copytree(REAL, tree)
    results = tree / "results" / SYSTEM_ID / "stable_diffusion"
    # What the package checker does before the summarizer runs: the RCP check writes scaling.json.
    rcp_checker.check_directory(str(results), "training", "5.0.0", False, False, rcp_pass="pruned_rcps",
                                set_scaling=True)
    verdict = run_rcp_checker(results, tmp_path / "rcp.log", rcp_bypass=False, enforced=True)
    assert verdict.passed and "scaled by 1.1111" in verdict.details[0]  # converged faster than the RCP mean

    records = []
    for log in sorted(results.glob("result_*.txt")):
        lines, _ = parse_file(str(log), ruleset="5.0.0")
        times = {line.key: line.timestamp for line in lines if line.key in ("run_start", "run_stop")}
        records.append(RunRecord(log, run_start_ms=times["run_start"], run_stop_ms=times["run_stop"]))
    raw = olympic_mean([r.minutes for r in records])
    assert raw == pytest.approx(11.6641166667, rel=1e-9)  # result_3's 11.664 min between 11.635 and 15.480

    system_name = json.loads(SYSTEM_JSON.read_text())["system_name"]  # the summarizer's rows name this
    summary, status = run_result_summarizer(tmp_path, "NVIDIA", system_name, tmp_path / "summarizer.log")
    assert status == 0 and summary.scaling_factor == pytest.approx(1706666.6666666667 / 1536000)
    assert summary.score_minutes == pytest.approx(raw * summary.scaling_factor, rel=1e-9)
    assert _summarizer_verdict(summary, status, raw, tmp_path / "summarizer.log").passed


def test_a_real_systems_json_is_accepted_as_it_is():
    fields, problems = load_system_config(SYSTEM_JSON)
    assert problems == [] and isinstance(fields["other_software_stack"], dict)
    platform = _events(RESULTS / "result_0.txt")
    platform = next(e["value"] for e in platform if e["key"] == "submission_platform")
    assert platform == "1xNVIDIA HGX B200" != fields["system_name"]  # folder id, system_name, platform all differ
    desc, problems = system_description(fields, SYSTEM_JSON, org="NVIDIA", system=platform, division="closed",
                                        num_nodes=1, gpus_per_node=8, submission_status="onprem")
    assert problems == []
    assert desc["system_name"] == "Nyx (1x NVIDIA DGX B200)" and desc["other_software_stack"]["nccl_version"]
    listed = {**fields, "other_software_stack": ["cuda 12.9", "nccl 2.26.3"]}
    assert system_description(listed, SYSTEM_JSON, org="NVIDIA", system=platform, division="closed", num_nodes=1,
                              gpus_per_node=8)[1] == []
    _, problems = system_description(fields, SYSTEM_JSON, org="NVIDIA", system=platform, division="closed",
                                     num_nodes=1, gpus_per_node=8, submission_status="cloud")
    assert len(problems) == 1 and "submission_status 'cloud'" in problems[0]
