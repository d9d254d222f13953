"""What a run directory of `sd-mlperf train` holds, read once for the plots and the end-of-run summary.

- `metrics.jsonl` (sd_mlperf.training.metrics): train records every log interval, eval records of inline
  evaluation (FID, CLIP and any further numeric metric, e.g. the toy metrics of synthetic runs);
- RUN/eval_offline/: offline evaluation (`sd-mlperf evaluate`): `scores.jsonl` (FID, CLIP) and one
  `step_XXXXXXX.json` per scored checkpoint (with the further metrics under `extra`);
- RUN/eval/step_XXXXXXX.png and RUN/eval_offline/step_XXXXXXX.png: the sample grids;
- the MLPerf log (mlperf.log, or mlperf_train.log while offline evaluation has not written the final log):
  init_start, run_start, run_stop (time and status), global_batch_size.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_mlperf.config import load_config
from sd_mlperf.config.load import RUN_CONFIG_FILE, global_batch_size, world_size
from sd_mlperf.config.schema import Config
from sd_mlperf.training.eval_checkpoints import EVAL_CHECKPOINT_DIR, read_index
from sd_mlperf.training.final_log import parse_mllog_line
from sd_mlperf.training.metrics import RESTART_KINDS, read_metrics
from sd_mlperf.training.mlperf_log import TRAINING_LOG_FILE, training_log_path
from sd_mlperf.training.offline_eval import OFFLINE_EVAL_DIR, read_score_records

INLINE_EVAL_DIR = "eval"
_GRID = re.compile(r"^step_(\d+)\.png$")
NOT_METRICS = frozenset({"kind", "step", "samples", "samples_count", "time", "seconds", "source"})
"""Record keys that are not quality metrics (the rest of an eval record's numeric keys are plotted)."""
MLPERF_KEYS = ("init_start", "run_start", "run_stop", "global_batch_size")


@dataclass
class Throughput:
    """Training speed from the train records: medians over log intervals, the first after each (re)start left out
    (it holds the first step's warm-up)."""

    img_per_s: float
    img_per_s_per_gpu: float
    num_intervals: int
    mfu: float | None
    peak_mem_gib: float | None


@dataclass
class RunData:
    """The parts of one run directory the report reads."""

    run_dir: Path
    cfg: Config
    records: list[dict[str, Any]] = field(default_factory=list)
    """metrics.jsonl, each step once (read_metrics)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Evaluations in samples order: `samples`, `step`, `source` (inline/offline) and the metrics."""
    mlperf: dict[str, dict[str, Any]] = field(default_factory=dict)
    """First MLPerf log event per key of MLPERF_KEYS (time_ms, value, metadata)."""
    mlperf_log: Path | None = None
    trained: tuple[int, str] | None = None
    """(samples trained, where that number comes from) from the authoritative record: the training_end of
    eval_checkpoints/index.jsonl, else the training log's run_stop, else its last block_stop; None without them."""

    @property
    def train(self) -> list[dict[str, Any]]:
        """The train records."""
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def world_size(self) -> int:
        """Data-parallel processes of the run."""
        return world_size(self.cfg)

    @property
    def global_batch_size(self) -> int:
        """The run's global batch (as logged, else from the config)."""
        logged = self.mlperf.get("global_batch_size", {}).get("value")
        return int(logged) if logged else global_batch_size(self.cfg)

    @property
    def on_gpu(self) -> bool:
        """Whether the run trained on GPUs (the progress line records peak memory exactly there)."""
        return any(_is_number(r.get("peak_mem_gib")) for r in self.train)

    def metric_names(self) -> list[str]:
        """Numeric metrics of the evaluations: fid, clip, then the others in order of appearance."""
        names: dict[str, None] = {"fid": None, "clip": None}
        for e in self.evals:
            names.update((k, None) for k, v in e.items() if k not in NOT_METRICS and _is_number(v))
        return [n for n in names if any(n in e for e in self.evals)]

    def grids(self) -> list[tuple[str, int, Path]]:
        """(source, step, path) of every sample grid, inline then offline, in step order."""
        found = []
        for source, sub in (("inline", INLINE_EVAL_DIR), ("offline", OFFLINE_EVAL_DIR)):
            folder = self.run_dir / sub
            if folder.is_dir():
                steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _GRID.match(p.name)))
                found += [(source, step, path) for step, path in steps]
        return found

    def throughput(self) -> Throughput | None:
        """Measured speed, or None without train records."""
        steady, first = [], True
        for r in self.records:
            if r.get("kind") in RESTART_KINDS:
                first = True
            elif r.get("kind") == "train":
                if not first and _is_number(r.get("img_per_s")):
                    steady.append(r)
                first = False
        intervals = steady or [r for r in self.train if _is_number(r.get("img_per_s"))]
        if not intervals:
            return None
        img_per_s = statistics.median(r["img_per_s"] for r in intervals)
        mfu = [r["mfu"] for r in intervals if _is_number(r.get("mfu"))]
        mem = [r["peak_mem_gib"] for r in self.train if _is_number(r.get("peak_mem_gib"))]
        return Throughput(img_per_s=img_per_s, img_per_s_per_gpu=img_per_s / self.world_size,
                          num_intervals=len(intervals), mfu=statistics.median(mfu) if mfu else None,
                          peak_mem_gib=max(mem) if mem else None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run(run_dir: str | os.PathLike, cfg: Config | None = None) -> RunData:
    """Read a run directory; `cfg` defaults to its config.yaml (loaded and validated as `sd-mlperf train` does)."""
    run_dir = Path(run_dir)
    if cfg is None:
        config = run_dir / RUN_CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(f"{config} does not exist: pass a run directory of `sd-mlperf train` "
                                    "(run.output_dir/run.name)")
        cfg = load_config([config])
    data = RunData(run_dir=run_dir, cfg=cfg)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        data.records = read_metrics(metrics)
    inline = [{**{k: v for k, v in r.items() if k not in ("kind", "time", "seconds")}, "source": "inline"}
              for r in data.records if r.get("kind") == "eval"]
    data.evals = sorted(inline + _offline_evals(run_dir), key=lambda e: (e["samples"], e["source"]))
    data.trained = _trained_samples(run_dir, cfg)
    for name in (cfg.logging.mlperf_log_file, TRAINING_LOG_FILE):
        if (run_dir / name).is_file():
            data.mlperf_log = run_dir / name
            data.mlperf = _mlperf_events(data.mlperf_log)
            break
    return data


def _offline_evals(run_dir: Path) -> list[dict[str, Any]]:
    """Offline scores: scores.jsonl, completed by each evaluation's JSON (further metrics under `extra`)."""
    by_step = {r["step"]: {"step": r["step"], "samples": r["samples_count"], "fid": r["fid"], "clip": r["clip"]}
               for r in read_score_records(run_dir)}
    folder = run_dir / OFFLINE_EVAL_DIR
    for path in sorted(folder.glob("step_*.json")) if folder.is_dir() else []:
        r = json.loads(path.read_text(encoding="utf-8"))
        if r.get("samples_count") is None:  # a checkpoint scored without its samples count: no x position
            continue
        by_step[r["step"]] = {**by_step.get(r["step"], {}), "step": r["step"], "samples": r["samples_count"],
                              "fid": r["fid"], "clip": r["clip"], **r.get("extra", {})}
    return [{**e, "source": "offline"} for e in by_step.values()]


def _trained_samples(run_dir: Path, cfg: Config) -> tuple[int, str] | None:
    """Samples trained, from the records that say so (not the progress records, written every log interval)."""
    _, end = read_index(run_dir)
    if end is not None:
        return int(end["samples_count"]), f"{EVAL_CHECKPOINT_DIR}/index.jsonl training_end ({end.get('reason')})"
    log = training_log_path(cfg, run_dir)
    if not log.is_file():
        return None
    last: tuple[int, str] | None = None
    for event in _read_mllog_events(log):
        count = (event.get("metadata") or {}).get("samples_count")
        if count is not None and event.get("key") in ("block_stop", "run_stop"):
            last = int(count), f"{log.name} {event['key']}"
    return last


def _read_mllog_events(path: Path) -> Iterator[dict[str, Any]]:
    """The MLLOG records of a log, skipping other lines and a line cut by a killed run."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                event = parse_mllog_line(line)
            except json.JSONDecodeError:  # a line cut by a killed run
                continue
            if event:
                yield event


def _mlperf_events(path: Path) -> dict[str, dict[str, Any]]:
    events: dict[str, dict[str, Any]] = {}
    for event in _read_mllog_events(path):
        if event.get("key") in MLPERF_KEYS:
            events.setdefault(event["key"], event)
    return events
