"""`sd-mlperf package`: fake run directories (no training) -> the submission layout, judged by the official checkers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from sd_mlperf.cli import main
from sd_mlperf.submission import PackagingError, package_runs
from sd_mlperf.submission.checkers import error_blocks
from sd_mlperf.submission.package import _swap_in
from sd_mlperf.submission.runs import olympic_dropped
from sd_mlperf.submission.system import AVAILABILITY, FROM_RUNS, REQUIRED_FIELDS, system_description
from tests.unit.submission._helpers import EXAMPLE_SYSTEM, ORG, SYSTEM, write_run, write_runs, write_system_config

BENCH = Path("results") / SYSTEM / "stable_diffusion"


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory) -> list[Path]:
    """Ten converged open-division runs with distinct seeds (written once; tests copy them)."""
    return write_runs(tmp_path_factory.mktemp("good"))


@pytest.fixture
def runs(good_runs, tmp_path) -> list[Path]:
    """A private copy of the ten good runs, free to spoil."""
    return [Path(shutil.copytree(r, tmp_path / "runs" / r.name)) for r in good_runs]


@pytest.fixture
def system_yaml(tmp_path) -> Path:
    return write_system_config(tmp_path / "system.yaml")


def _events(log: Path) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in log.read_text().splitlines() if ":::MLLOG" in line]


def _drop_keys(log: Path, *keys: str) -> None:
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(line for line in lines if not any(f'"key": "{k}"' in line for k in keys)))


def _relabel_closed(run: Path) -> None:
    """Rewrite the log's submission_division to closed (a tiny config cannot even load as a closed run)."""
    log = run / "mlperf.log"
    log.write_text(log.read_text().replace('"submission_division", "value": "open"',
                                           '"submission_division", "value": "closed"'))


def _without_subprocess_checkers(monkeypatch, *, package_checker: bool, summarizer: bool) -> None:
    """Replace the official checkers that run as subprocesses (seconds each, mostly imports) with a pass.

    The open-division end-to-end test runs them for real; tests aimed at another checker skip them.
    """
    from sd_mlperf.submission import package
    from sd_mlperf.submission.checkers import Summary, Verdict

    if package_checker:
        monkeypatch.setattr(package, "run_package_checker", lambda org_dir, log, **kw: Verdict("package checker",
                            True, "not run in this test"))
    if summarizer:
        monkeypatch.setattr(package, "run_result_summarizer",
                            lambda out, org, system, log: (Summary(_olympic_minutes(sorted(
                                out.glob(f"{org}/results/*/*/result_*.txt")))), 0))


def _olympic_minutes(logs: list[Path]) -> float:
    """The score computed here from the logs alone: mean run_start..run_stop after dropping fastest and slowest."""
    minutes = []
    for log in logs:
        t = {e["key"]: e["time_ms"] for e in _events(log) if e["key"] in ("run_start", "run_stop")}
        minutes.append((t["run_stop"] - t["run_start"]) / 60_000)
    kept = sorted(minutes)[1:-1]
    return sum(kept) / len(kept)


def _problems(excinfo) -> str:
    return str(excinfo.value)


# -- the official field lists we copy ------------------------------------------------------------------------------
def test_system_description_fields_match_the_official_checker(tmp_path):
    from mlperf_logging.system_desc_checker.system_desc_checker import check_system_desc

    fields = yaml.safe_load(write_system_config(tmp_path / "s.yaml").read_text())
    desc, problems = system_description(fields, tmp_path / "s.yaml", org=ORG, system=SYSTEM, division="open",
                                        num_nodes=1, gpus_per_node=1)
    assert problems == [] and list(desc) == list(REQUIRED_FIELDS)  # nothing beyond the required fields

    def valid(d: dict) -> bool:
        path = tmp_path / "d.json"
        path.write_text(json.dumps(d))
        return check_system_desc(str(path), "training", "5.0.0")[0]

    assert valid(desc)
    for name in REQUIRED_FIELDS:  # each of our required fields is one the checker requires
        assert not valid({k: v for k, v in desc.items() if k != name}), name
    for status in AVAILABILITY:
        assert valid({**desc, "status": status})
    assert not valid({**desc, "status": "onprem"})


def test_example_system_config_lists_every_field_as_a_placeholder(tmp_path):
    fields = yaml.safe_load(EXAMPLE_SYSTEM.read_text())
    assert set(fields) == set(REQUIRED_FIELDS) - set(FROM_RUNS) - {"system_name"}  # default: submission_platform
    _, problems = system_description(fields, EXAMPLE_SYSTEM, org=ORG, system=SYSTEM, division="open",
                                     num_nodes=None, gpus_per_node=None)
    assert len(problems) == 1 and "placeholders" in problems[0] and "status" in problems[0]


def test_olympic_drops_fastest_and_slowest_and_error_blocks_keep_continuations():
    assert olympic_dropped([3.0, 1.0, 5.0, 1.0, 5.0]) == (1, 4)
    log = "INFO - a\nERROR - Seed checker failed: x\nResult file b logs seed 1\nINFO - c\nERROR - RCP Test Failed: m\n"
    assert error_blocks(log) == ["Seed checker failed: x Result file b logs seed 1", "RCP Test Failed: m"]


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ten_open_runs_pass_every_checker_and_score_as_the_olympic_mean(runs, system_yaml, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["package", *map(str, runs[:6]), *[a for r in runs[6:] for a in ("--run-dir", str(r))], "--out", str(out),
            "--system-config", str(system_yaml)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    pkg = out / ORG
    assert sorted(p.name for p in pkg.iterdir()) == ["benchmarks", "results", "systems"]  # checker output is beside it
    for i, run in enumerate(runs):  # in the order given, byte for byte
        assert (pkg / BENCH / f"result_{i}.txt").read_bytes() == (run / "mlperf.log").read_bytes()
    system = json.loads((pkg / "systems" / f"{SYSTEM}.json").read_text())
    assert (system["submitter"], system["system_name"], system["division"]) == (ORG, SYSTEM, "open")
    impl = pkg / "benchmarks" / "stable_diffusion" / "implementations" / "sd_mlperf"
    assert (impl / "sd_mlperf" / "cli.py").is_file() and (impl / "conf" / "smoke.yaml").is_file()
    assert not list(impl.rglob("__pycache__"))

    assert "PACKAGE CHECKER FOUND NO ERRORS" in (out / "package_checker.log").read_text()
    expected = _olympic_minutes([r / "mlperf.log" for r in runs])
    official = json.loads((out / "result_summary.json").read_text())
    assert official[0]["stable_diffusion"] == pytest.approx(expected, rel=1e-9)

    summary = json.loads((out / "package_summary.json").read_text())
    assert summary["passed"] and summary["score_minutes"] == pytest.approx(expected, rel=1e-9)
    verdicts = {v["name"]: v for v in summary["verdicts"]}
    assert verdicts["package checker"]["passed"] and verdicts["seed checker"]["passed"]
    assert verdicts["result summarizer"]["passed"]
    # Open division: the toy batch has no RCP; reported, not enforced.
    assert not verdicts["RCP checker"]["passed"] and not verdicts["RCP checker"]["failed"]
    assert [r["dropped"] for r in summary["runs"]].count("fastest") == 1
    assert [r["seed"] for r in summary["runs"]] == list(range(1000, 1010))
    assert all(r["samples_to_target"] == 80 for r in summary["runs"])  # the second evaluation reaches the target
    # The official summarizer's score is the headline; the raw olympic mean and the scaling factor beside it.
    assert f"Score: {expected:.4f} min (the official result summarizer: raw olympic mean {expected:.4f} min" in printed
    assert "x RCP scaling factor 1.0000" in printed and "PASSED" in printed


def test_a_repeated_seed_is_refused_naming_both_runs(runs, system_yaml, tmp_path):
    shutil.rmtree(runs[4])
    write_run(runs[4], 1000, 12.0)  # run 0's seed
    message = _refused(runs, system_yaml, tmp_path / "out")
    assert f"seed 1000 is logged by {runs[0]} and {runs[4]}" in message


@pytest.mark.slow
def test_closed_division_path_needs_rcp_bypass_for_a_toy_batch(runs, system_yaml, tmp_path, capsys, monkeypatch):
    _without_subprocess_checkers(monkeypatch, package_checker=False, summarizer=True)
    # This relabel exists only to exercise the checkers' closed-division path (the package checker runs the seed
    # and RCP checks only for closed): tiny runs cannot be closed-division runs. The system json's division
    # follows the logs.
    for run in runs:
        _relabel_closed(run)
    from sd_mlperf.submission import runs as runs_module

    monkeypatch.setattr(runs_module, "closed_label_vs_config", lambda cfg: [])  # (refused otherwise, see below)
    out = tmp_path / "out"
    base = ["package", *map(str, runs), "--out", str(out), "--system-config", str(system_yaml)]
    assert main(base) == 1
    printed = capsys.readouterr().out
    assert json.loads((out / ORG / "systems" / f"{SYSTEM}.json").read_text())["division"] == "closed"
    assert re.search(r"RCP checker\s+FAIL\s+Missing RCP, please submit RCP with BS = 4", printed)
    assert re.search(r"package checker\s+FAIL", printed) and "RCP Test Failed: Missing RCP" in printed
    assert re.search(r"seed checker\s+PASS", printed)
    assert "Seed Checker" in (out / "package_checker.log").read_text()  # the closed path ran the seed check

    assert main([*base, "--rcp-bypass", "--force"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"package checker\s+PASS\s+no errors \(RCP check passed by --rcp-bypass\)", printed)
    assert re.search(r"RCP checker\s+PASS\s+Missing RCP.*passed using rcp_bypass", printed)


# -- what is refused (nothing is written) --------------------------------------------------------------------------
def _refused(runs: list[Path], system_yaml: Path, out: Path, **kwargs) -> str:
    with pytest.raises(PackagingError) as excinfo:
        package_runs(runs, out, system_yaml, **kwargs)
    assert not (out / ORG).exists() and not (out.exists() and any(out.glob(".*partial*")))
    return _problems(excinfo)


def test_every_bad_run_is_named_with_its_fix_in_one_error(runs, system_yaml, tmp_path):
    (runs[0] / "mlperf.log").unlink()
    _drop_keys(runs[1] / "mlperf.log", "run_stop")
    for i, kwargs in ((2, {"resumed_marker": True}), (3, {"start_samples": 40}),
                      (4, {"success": False, "evals": [(250.0, 0.08), (120.0, 0.1)]}),
                      (6, {"success": False, "evals": [(250.0, 0.08), (120.0, 0.1)]})):
        shutil.rmtree(runs[i])
        write_run(runs[i], 2000 + i, 12.0, **kwargs)
    shutil.rmtree(runs[5])
    write_run(runs[5], 2005, 12.0, "run.submission_platform=other_box")
    message = _refused(runs, system_yaml, tmp_path / "out")
    assert "6 problem(s)" in message
    assert f"{runs[0]}: no mlperf.log" in message
    assert f"{runs[1]}: no run_stop: the log is unfinished" in message
    assert f"sd-mlperf evaluate --run-dir {runs[1]}" in message
    assert f"{runs[2]}: a resumed run (it logs sd_mlperf_resumed" in message
    assert f"{runs[3]}: a resumed run (its run_start is at samples_count 40)" in message
    assert f"2 runs did not converge ({runs[4]}, {runs[6]}): olympic scoring drops one" in message
    assert re.search(rf"disagree on submission_platform .*: 'cpu_box' in .*; 'other_box' in {re.escape(str(runs[5]))}$",
                     message, flags=re.M)


def test_mismatching_division_and_a_log_the_checker_rejects(runs, system_yaml, tmp_path):
    _relabel_closed(runs[7])
    _drop_keys(runs[8] / "mlperf.log", "eval_samples")
    message = _refused(runs, system_yaml, tmp_path / "out")
    assert "disagree on submission_division" in message and f"'closed' in {runs[7]}" in message
    assert f"{runs[8]}: compliance checker: Required EXACTLY_ONE occurrence of 'eval_samples' but found 0" in message


def _keep_last_two_evaluations(log: Path) -> None:
    """The log of a `--last-two` evaluation: no eval lines before the second-to-last scored block."""
    counts = sorted({e["metadata"]["samples_count"] for e in _events(log) if e["key"] == "eval_accuracy"})
    early = set(counts[:-2])
    lines = log.read_text().splitlines(keepends=True)
    scored = ('"key": "eval_start"', '"key": "eval_accuracy"', '"key": "eval_stop"')
    log.write_text("".join(line for line in lines if not (
        any(k in line for k in scored) and json.loads(line.split(":::MLLOG ", 1)[1])["metadata"]["samples_count"]
        in early)))


def test_one_run_must_score_every_checkpoint_up_to_its_first_pass(runs, system_yaml, tmp_path):
    for i, run in enumerate(runs):
        shutil.rmtree(run)
        write_run(run, 3000 + i, 10.0 + i, evals=[(300.0, 0.05), (250.0, 0.08), (85.0, 0.16)])
        _keep_last_two_evaluations(run / "mlperf.log")
    message = _refused(runs, system_yaml, tmp_path / "out")
    assert "no run scores every collected checkpoint" in message and "--all" in message
    shutil.rmtree(runs[0])
    write_run(runs[0], 3000, 10.0, evals=[(300.0, 0.05), (250.0, 0.08), (85.0, 0.16)])  # scored with --all
    from sd_mlperf.submission.runs import check_runs

    _, problems = check_runs(runs, required=10, allow_count_mismatch=False)
    assert problems == []


def test_the_run_count_is_the_rules_unless_allowed(runs, system_yaml, tmp_path):
    message = _refused(runs[:9], system_yaml, tmp_path / "out")
    assert "9 run(s) given; the rules require exactly 10 for stable_diffusion" in message
    assert "at least 3" in _refused(runs[:2], system_yaml, tmp_path / "out", allow_run_count_mismatch=True)


def test_system_config_problems(runs, tmp_path):
    bad = write_system_config(tmp_path / "bad.json", cooling=None, framework=None, accelerators_per_node=8,
                              submitter="another_org")
    message = _refused(runs, bad, tmp_path / "out")
    assert "lacks required field(s) cooling, framework" in message
    assert "accelerators_per_node is 8 but the runs trained with parallel.gpus_per_node=1" in message
    assert "submitter is 'another_org' but the runs log 'testorg'" in message
    cloud = write_system_config(tmp_path / "cloud.json", status="Available cloud")
    assert "train with run.submission_status=cloud" in _refused(runs, cloud, tmp_path / "out")
    assert "placeholders" in _refused(runs, EXAMPLE_SYSTEM, tmp_path / "out")


def test_a_non_empty_package_folder_needs_force(runs, system_yaml, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ORG).mkdir(parents=True)
    (out / ORG / "old.txt").write_text("an earlier package")
    assert main(["package", *map(str, runs), "--out", str(out), "--system-config", str(system_yaml)]) == 1
    assert "PackagingError" in capsys.readouterr().err
    with pytest.raises(PackagingError, match=r"exists and is not empty: pass --force"):
        package_runs(runs, out, system_yaml)
    assert (out / ORG / "old.txt").exists()


def test_swap_in_puts_the_old_package_back_when_the_rename_fails(tmp_path, monkeypatch):
    build, final = tmp_path / ".org.partial-x", tmp_path / "org"
    build.mkdir()
    final.mkdir()
    (final / "old.txt").write_text("an earlier package")
    real_rename = Path.rename

    def rename(self, target):
        if self == build:
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _swap_in(build, final)
    assert (final / "old.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == [".org.partial-x", "org"]


def test_a_failed_write_leaves_the_old_package_and_no_partial_one(runs, system_yaml, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / ORG).mkdir(parents=True)
    (out / ORG / "old.txt").write_text("an earlier package")

    def broken_copytree(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken_copytree)
    with pytest.raises(OSError, match="disk full"):
        package_runs(runs, out, system_yaml, force=True)
    assert sorted(p.name for p in out.iterdir()) == [ORG] and (out / ORG / "old.txt").exists()


def test_the_cpu_rehearsal_system_config_is_accepted_by_us_and_the_official_checker(tmp_path):
    from mlperf_logging.system_desc_checker.system_desc_checker import check_system_desc

    path = EXAMPLE_SYSTEM.with_name("cpu_rehearsal.yaml")
    fields = yaml.safe_load(path.read_text())
    desc, problems = system_description(fields, path, org="cpu_rehearsal", system="cpu_box", division="open",
                                        num_nodes=1, gpus_per_node=1, submission_status="research")
    assert problems == [] and isinstance(desc["other_software_stack"], dict)
    (tmp_path / "cpu_box.json").write_text(json.dumps(desc))
    assert check_system_desc(str(tmp_path / "cpu_box.json"), "training", "5.0.0")[0]


def test_one_non_converged_run_is_packaged_with_a_warning(runs, system_yaml, tmp_path, capsys, monkeypatch):
    _without_subprocess_checkers(monkeypatch, package_checker=True, summarizer=True)
    shutil.rmtree(runs[4])
    write_run(runs[4], 2004, 30.0, success=False, evals=[(250.0, 0.08), (120.0, 0.1)])
    assert main(["package", *map(str, runs), "--out", str(tmp_path / "out"), "--system-config",
                 str(system_yaml)]) == 0
    printed = capsys.readouterr().out
    assert f"Warning: {runs[4]} did not converge (run_stop status 'aborted')" in printed
    summary = json.loads((tmp_path / "out" / "package_summary.json").read_text())
    assert summary["warnings"] and summary["runs"][4]["dropped"] == "slowest"


def test_a_run_the_summarizer_drops_counts_as_the_slowest():
    from sd_mlperf.submission.runs import RunRecord, olympic_mean

    failed = RunRecord(Path("r"), run_start_ms=0, run_stop_ms=60_000, compliant=False)  # a non-converged closed run
    assert failed.minutes == float("inf")
    from sd_mlperf.submission.package import PackageReport, RunResult

    report = PackageReport("p", "closed", "o", "s", 256, [RunResult(0, "r", "f", 1, None, failed.minutes)], 3.5, 3.5)
    assert json.loads(json.dumps(report.to_json(), allow_nan=False))["runs"][0]["minutes"] is None
    minutes = [failed.minutes, 2.0, 3.0, 4.0]
    assert olympic_dropped(minutes) == (1, 0) and olympic_mean(minutes) == 3.5
