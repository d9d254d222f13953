"""Run directories as submission material: read each run's final MLPerf log and config, find what disqualifies it.

A run directory holds `config.yaml` (the resolved config) and `mlperf.log` (the final MLPerf log). A run
counts only if its log is finished (run_stop), from a fresh start (no `sd_mlperf_resumed` line, run_start at
samples_count 0), passes the official compliance checker and the reviewer's checks (sd_mlperf.submission.audit:
the log is its config's and its evaluations' own). One run of a submission may fail to converge (olympic scoring
drops it, as real submissions did; a warning says so); two may not.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from sd_mlperf.config.load import RUN_CONFIG_FILE
from sd_mlperf.submission.audit import (
    closed_label_vs_config,
    cross_run_problems,
    evals_vs_scores,
    log_vs_config,
    logged_score,
    recorded_scores,
    run_stop_vs_collection,
)
from sd_mlperf.submission.checkers import BENCHMARK, RULESET, compliance_problems
from sd_mlperf.training.final_log import Score
from sd_mlperf.training.mlperf_log import RESUMED_KEY, TRAINING_LOG_FILE

LOG_FILE = "mlperf.log"


@dataclass
class RunRecord:
    """What the packager needs from one run: the log's submission keys, seed, timing and convergence point."""

    run_dir: Path
    division: str | None = None
    org: str | None = None
    platform: str | None = None
    seed: int | None = None
    global_batch_size: int | None = None
    run_start_ms: float | None = None
    run_stop_ms: float | None = None
    samples_to_target: int | None = None
    num_nodes: int | None = None
    gpus_per_node: int | None = None
    scored_every_checkpoint: bool = False
    """Every block_stop up to run_stop has its evaluation (the rules ask this of at least 1 of the 10 runs)."""
    status: str | None = None
    """run_stop's status: success, or aborted (not converged)."""
    submission_status: str | None = None
    cfg: DictConfig | None = field(default=None, repr=False)
    compliant: bool = True
    """The official compliance checker passes the log (a non-converged closed run fails it: the summarizer drops
    such a run, and counts the time of one that passes)."""

    @property
    def converged(self) -> bool:
        """run_stop says success."""
        return self.status == "success"

    @property
    def log_path(self) -> Path:
        """The run's final MLPerf log."""
        return self.run_dir / LOG_FILE

    @property
    def minutes(self) -> float:
        """run_start..run_stop in minutes, as the result summarizer scores it; inf for a run it drops (one that
        fails the compliance checker, as a non-converged closed-division run does)."""
        assert self.run_start_ms is not None and self.run_stop_ms is not None
        return (self.run_stop_ms - self.run_start_ms) / 60_000 if self.compliant else math.inf


def read_run(run_dir: Path) -> tuple[RunRecord, list[str]]:
    """Read one run directory; the problems are phrased to follow '<run_dir>: '."""
    from mlperf_logging.compliance_checker.mlp_parser import parse_file

    record = RunRecord(run_dir)
    if not run_dir.is_dir():
        return record, ["not a directory"]
    problems = _read_config(run_dir / RUN_CONFIG_FILE, record)
    log = run_dir / LOG_FILE
    if not log.is_file():
        if (run_dir / TRAINING_LOG_FILE).is_file():
            problems.append(f"no {LOG_FILE}, only the training log {TRAINING_LOG_FILE}: the offline evaluation has "
                            f"not run; run `sd-mlperf evaluate --run-dir {run_dir}`, which writes {LOG_FILE}")
        else:
            problems.append(f"no {LOG_FILE}: not a run directory of `sd-mlperf train`, or its run never started")
        return record, problems
    lines, errors = parse_file(str(log), ruleset=RULESET)
    if errors:
        return record, problems + [f"{LOG_FILE} has {len(errors)} line(s) that do not parse, e.g. {errors[0][0]!r}"]
    if record.cfg is None:
        return record, problems
    problems += _read_log(lines, record)
    if not problems:
        # Only for otherwise sound logs: an unfinished or resumed log fails the checker too, and the fix named
        # above comes first. A non-converged closed run fails it for its quality target only: the summarizer
        # drops that run (check_runs allows one).
        failed = compliance_problems(log)
        record.compliant = not failed
        if record.converged:
            problems += [f"compliance checker: {p}" for p in failed]
    return record, problems


def _read_config(path: Path, record: RunRecord) -> list[str]:
    """The data-parallel layout and the global batch from config.yaml (read as plain YAML: any schema version)."""
    from omegaconf import OmegaConf

    from sd_mlperf.config import global_batch_size

    if not path.is_file():
        return [f"no {RUN_CONFIG_FILE} (the trainer saves the resolved config there)"]
    try:
        cfg = record.cfg = OmegaConf.load(path)
        record.num_nodes, record.gpus_per_node = int(cfg.parallel.num_nodes), int(cfg.parallel.gpus_per_node)
        record.global_batch_size = int(global_batch_size(cfg))  # type: ignore[arg-type]  # reads 4 keys only
    except Exception as exc:  # noqa: BLE001 -- any unreadable config is the same problem for the user
        return [f"{RUN_CONFIG_FILE} does not give parallel.num_nodes, parallel.gpus_per_node, "
                f"training.micro_batch_size and training.grad_accumulation_steps: {type(exc).__name__}: {exc}"]
    return []


def _read_log(lines: list, record: RunRecord) -> list[str]:
    """Fill `record` from the parsed log lines; the problems that disqualify the run."""
    first: dict[str, object] = {}
    evals: dict[int, dict[str, float]] = defaultdict(dict)
    blocks: list[int] = []
    resumed = run_start_samples = stop_samples = None
    status = cache_clear = None
    for line in lines:
        value, metadata = line.value["value"], line.value["metadata"] or {}
        first.setdefault(line.key, value)
        if line.key == RESUMED_KEY:
            resumed = value
        elif line.key == "run_start" and record.run_start_ms is None:
            record.run_start_ms, run_start_samples = line.timestamp, metadata.get("samples_count", 0)
        elif line.key == "run_stop":
            record.run_stop_ms, status = line.timestamp, metadata.get("status")
            stop_samples = metadata.get("samples_count")
        elif line.key == "block_stop":
            blocks.append(int(metadata.get("samples_count", -1)))
        elif line.key == "eval_accuracy" and "metric" in metadata:
            evals[int(metadata["samples_count"])][metadata["metric"]] = float(value)
        elif line.key == "cache_clear":
            cache_clear = value
    record.division, record.org = first.get("submission_division"), first.get("submission_org")
    record.platform = first.get("submission_platform")
    record.seed = first.get("seed")  # type: ignore[assignment]
    record.status = status
    record.submission_status = first.get("submission_status")  # type: ignore[assignment]
    logged_gbs = first.get("global_batch_size")
    cfg = record.cfg
    assert cfg is not None
    tr = cfg.training
    # The run's own target (the closed division fixes it to the rules' FID <= 90, CLIP >= 0.15); the toy metrics
    # of synthetic runs are in the evaluator's records only.
    target_toy = dict(tr.get("target_toy") or {})
    scores = recorded_scores(record.run_dir)
    target = f"FID <= {tr.target_fid} and CLIP >= {tr.target_clip}" + "".join(
        f" and {k} >= {v}" for k, v in target_toy.items())

    def passes(count: int, m: dict[str, float]) -> bool:  # the log's FID and CLIP, the evaluator's toy metrics
        score = logged_score(m, scores.get(count, [])) if scores is not None else None
        logged = Score(0, count, 0, m.get("FID", math.inf), m.get("CLIP", -math.inf),
                       score.extra if score is not None else {})
        return logged.passes(tr.target_fid, tr.target_clip, target_toy)

    passing = [n for n, m in evals.items() if passes(n, m)]
    record.samples_to_target = min(passing) if passing else None
    upto = [n for n in blocks if record.samples_to_target is None or n <= record.samples_to_target]
    record.scored_every_checkpoint = bool(upto) and all(set(evals.get(n, {})) >= {"FID", "CLIP"} for n in upto)

    problems = log_vs_config(first, cfg, record.global_batch_size)
    if record.division == "closed":
        problems += closed_label_vs_config(cfg)
    if scores is not None:
        problems += evals_vs_scores(evals, scores)
    if status == "success":
        problems += run_stop_vs_collection(record.run_dir, record.run_stop_ms, stop_samples, record.samples_to_target)
    if first.get("submission_benchmark") != BENCHMARK:
        problems.append(f"submission_benchmark is {first.get('submission_benchmark')!r}, not {BENCHMARK!r}")
    if resumed is not None or (run_start_samples or 0) > 0:
        why = f"it logs {RESUMED_KEY} ({resumed})" if resumed is not None else \
            f"its run_start is at samples_count {run_start_samples}"
        problems.append(f"a resumed run ({why}): a resumed run is not a timed MLPerf run; train it again from scratch "
                        "(training.resume=never, or a new run directory)")
    if record.run_start_ms is None:
        problems.append("no run_start: training never started")
    elif record.run_stop_ms is None:
        problems.append(f"no run_stop: the log is unfinished. If training ended and evaluation is offline, run "
                        f"`sd-mlperf evaluate --run-dir {record.run_dir}` (it writes the final log); otherwise the "
                        "run was killed: train it again")
    elif status not in ("success", "aborted"):
        problems.append(f"run_stop has status {status!r}, neither success nor aborted")
    elif status == "success" and record.samples_to_target is None:
        problems.append(f"run_stop says success but no evaluation reaches the run's target ({target})")
    if logged_gbs is not None and record.global_batch_size is not None and logged_gbs != record.global_batch_size:
        problems.append(f"the log's global_batch_size {logged_gbs} differs from {RUN_CONFIG_FILE}'s "
                        f"{record.global_batch_size}: this config.yaml is not the log's run")
    if logged_gbs is not None:
        record.global_batch_size = int(logged_gbs)  # what the RCP checker reads
    if record.division == "closed" and cache_clear is not True:
        problems.append(f"cache_clear is {cache_clear!r}: a closed-division run must start with the page cache "
                        "dropped (launch with slurm/run_and_time.sh, which drops it)")
    return problems


def check_runs(run_dirs: list[Path], *, required: int, allow_count_mismatch: bool) -> tuple[list[RunRecord], list[str]]:
    """Read every run; return the records and ALL problems (per run, across runs, and the run count)."""
    problems: list[str] = []
    if len(run_dirs) != required:
        if not allow_count_mismatch:
            problems.append(f"{len(run_dirs)} run(s) given; the rules require exactly {required} for {BENCHMARK} "
                            "(--allow-run-count-mismatch packages another number, for a rehearsal only)")
        elif len(run_dirs) < 3:
            problems.append(f"{len(run_dirs)} run(s) given; olympic scoring drops the fastest and the slowest, so "
                            "even a rehearsal needs at least 3")
    seen: dict[Path, Path] = {}
    records = []
    for run_dir in run_dirs:
        key = run_dir.resolve()
        if key in seen:
            problems.append(f"{run_dir}: given twice (also as {seen[key]})")
            continue
        seen[key] = run_dir
        record, own = read_run(run_dir)
        problems += [f"{run_dir}: {p}" for p in own]
        records.append(record)
    problems += cross_run_problems([(r.run_dir, r.cfg, r.global_batch_size, r.seed) for r in records])
    unconverged = [str(r.run_dir) for r in records if r.status == "aborted"]
    if len(unconverged) > 1:
        problems.append(f"{len(unconverged)} runs did not converge ({', '.join(unconverged)}): olympic scoring drops "
                        "one; replace the others with converged runs")
    if records and not any(r.scored_every_checkpoint for r in records):
        problems.append("no run scores every collected checkpoint up to its first passing one: the rules ask this of "
                        "1 of the 10 runs (the others may score just the first passing checkpoint and the one before "
                        "it); evaluate one run with `sd-mlperf evaluate --run-dir RUN --all`")
    for attr, key in (("division", "submission_division"), ("org", "submission_org"),
                      ("platform", "submission_platform"), ("submission_status", "submission_status"),
                      ("global_batch_size", "global_batch_size")):
        by_value: dict[object, list[str]] = defaultdict(list)
        for r in records:
            if getattr(r, attr) is not None:
                by_value[getattr(r, attr)].append(str(r.run_dir))
        if len(by_value) > 1:
            listed = "; ".join(f"{v!r} in {', '.join(dirs)}" for v, dirs in by_value.items())
            problems.append(f"the runs disagree on {key} (one submission is one division, org, system and global "
                            f"batch): {listed}")
    return records, problems


def olympic_mean(values: list[int] | list[float]) -> float:
    """Mean after dropping the smallest and the largest value: how MLPerf scores a benchmark's runs and averages
    an RCP's (the RCP checker drops one run at each end for Stable Diffusion)."""
    kept = sorted(values)[1:-1]
    assert kept, "an olympic mean needs more than two values"
    return sum(kept) / len(kept)


def olympic_dropped(minutes: list[float]) -> tuple[int, int]:
    """Indices of the fastest and the slowest run, which olympic scoring drops (ties: the earlier run)."""
    order = sorted(range(len(minutes)), key=lambda i: (minutes[i], i))
    return order[0], order[-1]
