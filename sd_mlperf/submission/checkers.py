"""The official MLCommons checkers (mlperf-logging), run on one log or on a submission package.

Each wrapper returns a `Verdict` and keeps the checker's own output in a log file. Behaviours that the
wrappers rely on (mlperf-logging 4.1.68):
- the compliance checker and the seed and RCP checkers log through the root logger; they run in-process
  here with that output captured (`captured_root_logging`);
- `python -m mlperf_logging.package_checker` always exits 0: its verdict is the last line of its log,
  "PACKAGE CHECKER FOUND NO ERRORS" or "... FOUND ERRORS", with the reasons on ERROR lines. It runs the seed
  and RCP checks only when the system json says division "closed";
- the RCP checker's `rcp_bypass` turns only three failures into a pass: "RCP found" and "RCP Interpolation"
  (converged faster than the RCP allows) and "Missing RCP" (no RCP for this global batch). It cannot pass
  "Could not detect global_batch_size", "Insufficient convergence" or "Cannot find any RCPs";
- `python -m mlperf_logging.result_summarizer` writes summary.json into its working directory, and without
  --csv overwrites it with the detailed table; with `--csv X.csv` it writes X.json (one score per benchmark)
  and X_detailed.json. It never applies an RCP bypass, and it multiplies the olympic mean by the factor in a
  `scaling.json` that the RCP checkers may write beside the results (set_scaling).
  `result_summarizer.compute_score` is broken in this version (unpacks 4 values from a 5-tuple): unused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sd_mlperf.config.rcp import MLPERF_BENCHMARK, MLPERF_RULESET, MLPERF_USAGE

USAGE, RULESET, BENCHMARK = MLPERF_USAGE, MLPERF_RULESET, MLPERF_BENCHMARK
SUBPROCESS_TIMEOUT_S = 1800
_LEVEL_PREFIXES = ("DEBUG - ", "INFO - ", "WARNING - ", "ERROR - ", "CRITICAL - ")


@dataclass
class Verdict:
    """One checker's result. `enforced=False`: reported, but the rules do not require it to pass here."""

    name: str
    passed: bool
    message: str
    details: list[str] = field(default_factory=list)
    log: Path | None = None
    enforced: bool = True

    @property
    def failed(self) -> bool:
        """Whether this verdict makes the package fail."""
        return self.enforced and not self.passed


@contextlib.contextmanager
def captured_root_logging(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Route the root logger (where mlperf_logging's checkers log) into a list, for the duration only."""
    root = logging.getLogger()
    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = [_Collect()]
    root.setLevel(level)
    try:
        yield records
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _write_records(records: Sequence[logging.LogRecord], path: Path) -> None:
    path.write_text("".join(f"{r.levelname} - {r.getMessage()}\n" for r in records), encoding="utf-8")


def compliance_problems(log: Path) -> list[str]:
    """Failed rules of the compliance checker (training 5.0.0) for one log, condensed to a line each."""
    from mlperf_logging.compliance_checker import mlp_compliance

    checker = mlp_compliance.make_checker(usage=USAGE, ruleset=RULESET, quiet=True, werror=False)
    # The checker queues rule files in a module-level list that a failed earlier call may have left full.
    mlp_compliance.enqueued_configs.clear()
    with captured_root_logging(logging.WARNING):
        valid, _, _, _ = mlp_compliance.main(str(log), f"{USAGE}_{RULESET}/common.yaml", checker)
    if valid:
        return []
    messages = [*checker.overwritable.values(), *checker.not_overwritable]
    return [_condense(m) for m in messages] or ["the compliance checker failed without a message"]


def _condense(message: str) -> str:
    """A checker message without its context dump and the raw log line."""
    head = message.split("\ncurrent context")[0]
    return "; ".join(line.strip() for line in head.splitlines() if line.strip() and ":::MLLOG" not in line)


def error_blocks(log_text: str) -> list[str]:
    """ERROR lines of a checker log, each with its continuation lines (messages may span lines)."""
    blocks: list[list[str]] = []
    in_error = False
    for line in log_text.splitlines():
        if line.startswith("ERROR - "):
            blocks.append([line[len("ERROR - "):].strip()])
            in_error = True
        elif line.startswith(_LEVEL_PREFIXES):
            in_error = False
        elif in_error and line.strip():
            blocks[-1].append(line.strip())
    return [" ".join(b) for b in blocks]


def run_package_checker(org_dir: Path, log: Path, *, rcp_bypass: bool) -> Verdict:
    """`python -m mlperf_logging.package_checker ORG training 5.0.0`, judged by its log (it always exits 0)."""
    log.unlink(missing_ok=True)  # the checker appends to an existing log (logging.basicConfig)
    cmd = [sys.executable, "-m", "mlperf_logging.package_checker", str(org_dir.resolve()), USAGE, RULESET,
           *(["--rcp-bypass"] if rcp_bypass else []), "--log_output", str(log.resolve())]
    name = "package checker"
    try:
        proc = subprocess.run(cmd, cwd=log.parent, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Verdict(name, False, f"did not finish in {SUBPROCESS_TIMEOUT_S} s", log=log)
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    errors = error_blocks(text)
    if proc.returncode != 0 or "PACKAGE CHECKER FOUND" not in text:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return Verdict(name, False, f"crashed (exit status {proc.returncode}) before its verdict", errors + tail,
                       log)
    if "PACKAGE CHECKER FOUND NO ERRORS" in text and not errors:
        bypassed = [line for line in text.splitlines() if "passed using rcp_bypass" in line]
        return Verdict(name, True, "no errors" + (" (RCP check passed by --rcp-bypass)" if bypassed else ""),
                       log=log)
    return Verdict(name, False, f"found errors ({len(errors)} ERROR line(s))", errors, log)


def run_rcp_checker(benchmark_dir: Path, log: Path, *, rcp_bypass: bool, enforced: bool) -> Verdict:
    """The RCP check as the package checker runs it (pruned RCPs), without writing scaling.json."""
    from mlperf_logging.rcp_checker import rcp_checker

    name = "RCP checker"
    with captured_root_logging() as records:
        try:
            passed, message, norm = rcp_checker.check_directory(
                str(benchmark_dir), USAGE, RULESET, verbose=False, bert_train_samples=False, rcp_pass="pruned_rcps",
                rcp_bypass=rcp_bypass, set_scaling=False)
        except Exception as exc:  # noqa: BLE001 -- a crash in the official tool is its verdict
            passed, message, norm = False, f"crashed: {type(exc).__name__}: {exc}", 1.0
    _write_records(records, log)
    details = []
    if passed and norm != 1.0:
        details.append(f"faster than the RCP mean: the official score is scaled by {norm:.4f}")
    if not passed and not rcp_bypass and message.startswith(("RCP found", "RCP Interpolation", "Missing RCP")):
        details.append("--rcp-bypass would pass this (the submission committee then reviews it)")
    if not enforced:
        details.append("open division: the rules do not require the RCP check (the package checker skips it)")
    return Verdict(name, bool(passed), message.strip(), details, log, enforced)


def run_seed_checker(result_files: Sequence[Path], log: Path) -> Verdict:
    """The seed checker (one seed per run, no seed repeated on the same source line), in any division."""
    from mlperf_logging.package_checker.seed_checker import SeedChecker

    with captured_root_logging() as records:
        passed = SeedChecker(RULESET).check_seeds([str(f) for f in result_files])
    _write_records(records, log)
    prefix = "Seed checker failed and found the following errors:"
    errors = [line.replace(prefix, "").strip() for r in records if r.levelno >= logging.ERROR
              for line in r.getMessage().splitlines() if line.replace(prefix, "").strip()]
    return Verdict("seed checker", bool(passed), "each run logs its own seed" if passed else "seeds repeat or are "
                   "missing", errors, log)


@dataclass
class Summary:
    """What the result summarizer reported for the benchmark."""

    score_minutes: float | None
    scaling_factor: float = 1.0
    rcp: str = ""
    output: list[str] = field(default_factory=list)


def run_result_summarizer(out_dir: Path, org: str, system_name: str, log: Path) -> tuple[Summary, int]:
    """`python -m mlperf_logging.result_summarizer ORG training 5.0.0` in out_dir: its score and exit status.

    Its rows name a system by the description's system_name (not the results-folder id)."""
    cmd = [sys.executable, "-m", "mlperf_logging.result_summarizer", org, USAGE, RULESET, "--csv",
           "result_summary.csv"]
    try:
        proc = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Summary(None, output=[f"did not finish in {SUBPROCESS_TIMEOUT_S} s"]), 124
    output = proc.stdout + proc.stderr
    log.write_text(output, encoding="utf-8")
    lines = [line for line in output.splitlines() if line.strip() and line.strip() != "Strong Scaling Scores:"]
    summary = Summary(None, output=lines[-15:])
    if proc.returncode != 0:
        return summary, proc.returncode
    row = _summary_row(out_dir / "result_summary.json", org, system_name)
    summary.score_minutes = row.get(BENCHMARK)
    detailed = _summary_row(out_dir / "result_summary_detailed.json", org, system_name)
    summary.scaling_factor = float(detailed.get(f"{BENCHMARK}:rcp_scaling_factor") or 1.0)
    summary.rcp = detailed.get(f"{BENCHMARK}:RCP") or ""
    return summary, proc.returncode


def _summary_row(path: Path, org: str, system: str) -> dict:
    if not path.exists():
        return {}
    rows = json.loads(path.read_text(encoding="utf-8"))
    return next((r for r in rows if r.get("submitter") == org and r.get("system") == system), {})
