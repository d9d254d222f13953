"""N run directories -> the MLPerf Training submission layout, checked by the official checkers, and the score.

    OUT/<org>/results/<system>/stable_diffusion/result_<i>.txt      each run's mlperf.log, in the order given
    OUT/<org>/systems/<system>.json                                 from --system-config + the runs' keys
    OUT/<org>/benchmarks/stable_diffusion/implementations/sd_mlperf/ this implementation's source
    OUT/*.log, OUT/result_summary*.json, OUT/package_summary.json  checker output, beside the package

<org> and the division come from the runs' logs (submission_org, submission_division); <system> is the
results-folder id (--system-id, by default the runs' submission_platform), which only has to be a safe file
name: the system description's system_name and the logs' submission_platform may differ from it and from each
other, as in real results. Nothing is written unless every run qualifies; the package is built in a temporary
directory and renamed into place. The score is the official result summarizer's (the olympic mean of the
run times, scaled by the RCP checker's factor); the raw olympic mean is shown beside it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd_mlperf.submission.checkers import (
    BENCHMARK,
    RULESET,
    USAGE,
    Summary,
    Verdict,
    run_package_checker,
    run_rcp_checker,
    run_result_summarizer,
    run_seed_checker,
)
from sd_mlperf.submission.runs import RunRecord, check_runs, olympic_dropped, olympic_mean
from sd_mlperf.submission.system import load_system_config, system_description

IMPLEMENTATION = "sd_mlperf"
# Copied beside the package directory when present (a source checkout); pyproject.toml pins the dependencies.
SOURCE_EXTRAS = ("conf", "slurm", "docker", "docs", "README.md", "pyproject.toml")
SUMMARY_FILE = "package_summary.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_SCORE_RTOL = 1e-6


class PackagingError(ValueError):
    """The runs or the system config cannot make a package; the message lists every problem and its fix."""


@dataclass
class RunResult:
    """One packaged run, as the summary shows it."""

    index: int
    run_dir: str
    result_file: str
    seed: int | None
    samples_to_target: int | None
    minutes: float
    dropped: str = ""


@dataclass
class PackageReport:
    """What `package_runs` made and what the checkers said."""

    package_dir: str
    division: str
    org: str
    system: str
    global_batch_size: int
    runs: list[RunResult]
    score_minutes: float
    """The raw olympic mean of the run times (non-converged runs the summarizer drops count as the slowest)."""
    summarizer_score_minutes: float | None
    """The official score: the result summarizer's olympic mean x its RCP scaling factor (the headline)."""
    scaling_factor: float = 1.0
    warnings: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every enforced checker passed."""
        return not any(v.failed for v in self.verdicts)

    def to_json(self) -> dict:
        """The report as package_summary.json holds it."""
        data = asdict(self)
        data["verdicts"] = [{**asdict(v), "log": str(v.log) if v.log else None, "failed": v.failed}
                            for v in self.verdicts]
        for run in data["runs"]:  # strict JSON has no inf: a run the summarizer drops has no time it scores
            run["minutes"] = run["minutes"] if math.isfinite(run["minutes"]) else None
        return {**data, "passed": self.passed, "usage": USAGE, "ruleset": RULESET, "benchmark": BENCHMARK}


def required_run_count() -> int:
    """Runs per submission the rules require for stable_diffusion (mlperf_logging.benchmark_meta)."""
    from mlperf_logging.benchmark_meta import get_result_file_counts

    return get_result_file_counts(USAGE)[BENCHMARK]


def implementation_sources() -> list[Path]:
    """The sd_mlperf package directory and, in a source checkout, the SOURCE_EXTRAS beside it."""
    package = Path(__file__).resolve().parents[1]
    root = package.parent
    extras = [root / name for name in SOURCE_EXTRAS if (root / name).exists()] if (root / "pyproject.toml").is_file() \
        else []
    return [package, *extras]


@dataclass
class _Plan:
    """What validation settled: the qualifying runs, the names from their logs and the system json."""

    runs: list[RunRecord]
    org: str
    system: str
    division: str
    desc: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def package_runs(run_dirs: list[Path], out_dir: Path, system_config: Path, *, rcp_bypass: bool = False,
                 allow_run_count_mismatch: bool = False, force: bool = False,
                 system_id: str | None = None) -> PackageReport:
    """Validate the runs, write the package under out_dir, run the official checkers; raise PackagingError first.

    `system_id` names the results folder and the system json (default: the runs' submission_platform)."""
    out_dir = Path(out_dir)
    plan = _validate([Path(d) for d in run_dirs], out_dir, Path(system_config),
                     allow_run_count_mismatch=allow_run_count_mismatch, force=force, system_id=system_id)
    result_files = _write_package(plan, out_dir)
    package_dir = out_dir / plan.org
    verdicts = [
        run_package_checker(package_dir, out_dir / "package_checker.log", rcp_bypass=rcp_bypass),
        run_rcp_checker(result_files[0].parent, out_dir / "rcp_checker.log", rcp_bypass=rcp_bypass,
                        enforced=plan.division == "closed"),
        run_seed_checker(result_files, out_dir / "seed_checker.log"),
    ]
    minutes = [r.minutes for r in plan.runs]
    fastest, slowest = olympic_dropped(minutes)  # the runs the score leaves out, marked in the report
    score = olympic_mean(minutes)
    summary, status = run_result_summarizer(out_dir, plan.org, str(plan.desc.get("system_name", plan.system)),
                                            out_dir / "result_summarizer.log")
    verdicts.append(_summarizer_verdict(summary, status, score, out_dir / "result_summarizer.log"))
    report = PackageReport(
        package_dir=str(package_dir), division=plan.division, org=plan.org, system=plan.system,
        global_batch_size=int(plan.runs[0].global_batch_size or 0),
        runs=[RunResult(i, str(r.run_dir), str(f), r.seed, r.samples_to_target, r.minutes,
                        "fastest" if i == fastest else "slowest" if i == slowest else "")
              for i, (r, f) in enumerate(zip(plan.runs, result_files))],
        score_minutes=score, summarizer_score_minutes=summary.score_minutes, scaling_factor=summary.scaling_factor,
        warnings=plan.warnings, verdicts=verdicts)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return report


def _validate(run_dirs: list[Path], out_dir: Path, system_config: Path, *, allow_run_count_mismatch: bool,
              force: bool, system_id: str | None = None) -> _Plan:
    """Every reason not to package, gathered into one PackagingError; else the plan."""
    if not run_dirs:
        raise PackagingError("no run directories given (--run-dir RUN, repeated, or positional RUN ...)")
    runs, problems = check_runs(run_dirs, required=required_run_count(), allow_count_mismatch=allow_run_count_mismatch)
    fields, system_problems = load_system_config(system_config)
    problems += system_problems
    # The first run that logs them (cross-run disagreements are problems already).
    org = next((r.org for r in runs if r.org), "")
    platform = next((r.platform for r in runs if r.platform), "")
    system = system_id or platform
    division = next((r.division for r in runs if r.division), "")
    for value, key in ((org, "submission_org"), (platform, "submission_platform"), (division, "submission_division")):
        if not value and not problems:
            problems.append(f"no run logs {key}")
    if org and not _NAME.match(org):
        problems.append(f"the runs' submission_org {org!r} names a folder of the package: use letters, digits and "
                        ". _ + - (set run.submission_org before training)")
    if system and not _NAME.match(system):
        where = "--system-id" if system_id else "the runs' submission_platform (the default --system-id)"
        problems.append(f"{where} {system!r} names the results folder and the system json: use letters, digits and "
                        ". _ + - (pass --system-id ID; system_name and submission_platform may stay as they are)")
    warnings = [f"{r.run_dir} did not converge (run_stop status {r.status!r}): olympic scoring drops it as the "
                "slowest run, as the rules allow for one run" for r in runs if r.status == "aborted"]
    desc: dict[str, str] = {}
    if fields:
        layouts = {(r.num_nodes, r.gpus_per_node) for r in runs}
        nodes, gpus = layouts.pop() if len(layouts) == 1 else (None, None)
        desc, more = system_description(fields, system_config, org=org, system=platform, division=division,
                                        num_nodes=nodes, gpus_per_node=gpus,
                                        submission_status=next((r.submission_status for r in runs), None))
        problems += more
    package_dir = out_dir / org
    if out_dir.exists() and not out_dir.is_dir():
        problems.append(f"--out {out_dir} is a file, not a directory")
    elif org and package_dir.exists() and (not package_dir.is_dir() or any(package_dir.iterdir())) and not force:
        problems.append(f"{package_dir} exists and is not empty: pass --force to replace it, or choose another --out")
    for source in implementation_sources():
        if out_dir.resolve().is_relative_to(source.resolve()):
            problems.append(f"--out {out_dir} is inside {source}, which the package copies: choose another --out")
    if problems:
        raise PackagingError(f"cannot package {len(run_dirs)} run(s); {len(problems)} problem(s):\n"
                             + "\n".join(f"  - {p}" for p in problems))
    return _Plan(runs, org, system, division, desc, warnings)


def _write_package(plan: _Plan, out_dir: Path) -> list[Path]:
    """Build OUT/<org> in a temporary sibling, then rename it into place (replacing an old one only at the end)."""
    runs, desc, org, system = plan.runs, plan.desc, plan.org, plan.system
    out_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{org}.partial-", dir=out_dir))
    try:
        results = build / "results" / system / BENCHMARK
        results.mkdir(parents=True)
        for i, run in enumerate(runs):
            shutil.copyfile(run.log_path, results / f"result_{i}.txt")
        (build / "systems").mkdir()
        (build / "systems" / f"{system}.json").write_text(json.dumps(desc, indent=4) + "\n", encoding="utf-8")
        impl = build / "benchmarks" / BENCHMARK / "implementations" / IMPLEMENTATION
        impl.mkdir(parents=True)
        for source in implementation_sources():
            if source.is_dir():
                shutil.copytree(source, impl / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, impl / source.name)
        _swap_in(build, out_dir / org)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return [out_dir / org / "results" / system / BENCHMARK / f"result_{i}.txt" for i in range(len(runs))]


def _swap_in(build: Path, final: Path) -> None:
    """Rename `build` to `final`; an existing `final` is set aside first and deleted only once the new one is in."""
    old = final.with_name(f"{build.name}.old") if final.exists() else None
    if old is not None:
        final.rename(old)
    try:
        build.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old)


def _summarizer_verdict(summary: Summary, status: int, score: float, log: Path) -> Verdict:
    """The summarizer passes when it scores the package as the olympic mean (times its RCP scaling factor)."""
    name = "result summarizer"
    notes = [line for line in summary.output if "ERROR" in line or "NOTICE" in line or "result_" in line]
    if summary.rcp and summary.rcp != "Pass":
        notes = [line for line in notes if "RCP Test Failed" not in line]
        notes.append(f"its own RCP check says {summary.rcp!r} (the summarizer never applies --rcp-bypass)")
    if status != 0 or summary.score_minutes is None:
        return Verdict(name, False, f"no {BENCHMARK} score (exit status {status})", summary.output, log)
    expected = score * summary.scaling_factor
    if abs(summary.score_minutes - expected) > _SCORE_RTOL * max(1.0, expected):
        return Verdict(name, False, f"scored {summary.score_minutes:.4f} min, but the olympic mean of the logs is "
                       f"{score:.4f} min x scaling {summary.scaling_factor:.4f}", notes, log)
    scaled = f" (olympic mean x RCP scaling factor {summary.scaling_factor:.4f})" if summary.scaling_factor != 1 else ""
    return Verdict(name, True, f"score {summary.score_minutes:.4f} min{scaled}", notes, log)


def format_report(report: PackageReport) -> str:
    """The human summary: runs, dropped runs, score, each checker's verdict."""
    lines = [f"Packaged {len(report.runs)} run(s) as {report.package_dir} (division {report.division}, system "
             f"{report.system}, global batch {report.global_batch_size})", ""]
    width = max(len("run"), *(len(r.run_dir) for r in report.runs))
    lines.append(f"  {'#':>2}  {'run':<{width}}  {'seed':>12}  {'samples to target':>17}  {'minutes':>9}  olympic")
    for r in report.runs:
        seed = "-" if r.seed is None else str(r.seed)
        samples = "-" if r.samples_to_target is None else str(r.samples_to_target)
        lines.append(f"  {r.index:>2}  {r.run_dir:<{width}}  {seed:>12}  {samples:>17}  {r.minutes:>9.3f}  "
                     + (f"dropped ({r.dropped})" if r.dropped else "kept"))
    dropped = {r.dropped: r.index for r in report.runs if r.dropped}
    olympic = (f"raw olympic mean {report.score_minutes:.4f} min (mean of {len(report.runs) - 2} runs; the fastest, "
               f"run {dropped.get('fastest')}, and the slowest, run {dropped.get('slowest')}, dropped)")
    if report.summarizer_score_minutes is not None:
        lines += ["", f"Score: {report.summarizer_score_minutes:.4f} min (the official result summarizer: {olympic} x "
                  f"RCP scaling factor {report.scaling_factor:.4f})"]
    else:
        lines += ["", f"Score: none from the official result summarizer (see its verdict); {olympic}"]
    lines += [f"Warning: {w}" for w in report.warnings]
    lines += ["", "Checkers:"]
    for v in report.verdicts:
        state = "PASS" if v.passed else "FAIL" if v.enforced else "FAIL (not enforced)"
        lines.append(f"  {v.name:<18} {state:<20} {v.message}" + (f"  [{v.log}]" if v.log else ""))
        lines += [f"      {d}" for d in v.details]
    lines += ["", f"{'PASSED' if report.passed else 'FAILED'}: summary in "
              f"{Path(report.package_dir).parent / SUMMARY_FILE}"]
    return "\n".join(lines) + "\n"
