"""The MLPerf log: every MLPerf event of a run goes through `MLPerfLogger` (rank 0 writes, others no-op).

Keys and cadence follow the `training_5.0.0` stable_diffusion rules of the official compliance checker
(REFERENCE.md, "MLPerf log"): the submission and hyperparameter keys exactly once, init_start ->
init_stop -> run_start -> blocks (samples_count) -> eval_start, eval_accuracy per metric, eval_stop ->
run_stop with metadata.status.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sd_mlperf.config.load import peak_learning_rate
from sd_mlperf.config.schema import Config
from sd_mlperf.utils.files import write_error

# Reference dataset sizes (REFERENCE.md, "Data" and "Evaluation").
COCO_EVAL_SAMPLES = 30_000

TRAINING_LOG_FILE = "mlperf_train.log"
"""With offline evaluation (eval.inline=false) the trainer writes this log; `sd-mlperf evaluate --run-dir`
adds the scored checkpoints and run_stop and writes the final log (logging.mlperf_log_file)."""
RESUMED_KEY = "sd_mlperf_resumed"
"""Marks a log whose run resumed from a checkpoint: not a valid timed run (`sd-mlperf package` refuses it).
The compliance checker allows keys it does not know."""
CACHE_CLEARED_ENV = "SD_MLPERF_CACHE_CLEARED"
"""Set to 1 by the launcher that dropped the page cache before this run (slurm/run_and_time.sh); the log's
cache_clear says true only then (MLPerf rules: the cache is flushed before each run)."""

_instance_ids = itertools.count()


class _LoudFileHandler(logging.FileHandler):
    """A FileHandler whose failed write (a full disk) raises, naming the file, instead of printing a traceback
    and going on without the line (logging's default)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 -- logging's name
        raise write_error(sys.exc_info()[1] or OSError("write failed"), self.baseFilename, "the MLPerf log")


def page_cache_cleared() -> bool:
    """Whether the launcher says it dropped the page cache before this process started."""
    return os.environ.get(CACHE_CLEARED_ENV, "") == "1"


def training_log_path(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """The log the trainer writes: the final one with inline evaluation, else the training part of it."""
    return Path(run_dir) / (cfg.logging.mlperf_log_file if cfg.eval.inline else TRAINING_LOG_FILE)


def _counts(samples_count: int, step: int | None) -> dict[str, int]:
    """samples_count, and step_num when the step is known (as the v5.0 results log their run_stop)."""
    return {"samples_count": samples_count, **({"step_num": step} if step is not None else {})}


def logged_hyperparameters(cfg: Any, global_batch_size: int | None) -> dict[str, Any]:
    """What `MLPerfLogger.hyperparameters` logs, key -> value, in order (a Config or the run's config.yaml as a
    DictConfig; without a global batch, no global_batch_size and no opt_base_learning_rate)."""
    o = cfg.optim
    out: dict[str, Any] = {"seed": cfg.run.seed, "train_samples": cfg.data.num_train_samples,
                           "eval_samples": cfg.eval.num_prompts, "global_batch_size": global_batch_size,
                           "gradient_accumulation_steps": cfg.training.grad_accumulation_steps, "opt_name": o.name,
                           "opt_adamw_beta_1": o.beta1, "opt_adamw_beta_2": o.beta2, "opt_adamw_epsilon": o.eps,
                           "opt_adamw_weight_decay": o.weight_decay,
                           # The lr after warmup (base per sample x global batch, e.g. 7.168e-05 = 2.8e-7 x 256), as
                           # the reference logs it and every v5.0 submission does; the RCP files record the
                           # per-sample base (sd_mlperf.config.rcp).
                           "opt_base_learning_rate": None, "opt_learning_rate_warmup_steps": o.warmup_steps}
    if global_batch_size is None:
        del out["global_batch_size"], out["opt_base_learning_rate"]
    else:
        out["opt_base_learning_rate"] = peak_learning_rate(o, global_batch_size)
    return out


class MLPerfLogger:
    """Writes MLPerf events with `mlperf_logging.mllog` to one file; a disabled logger (ranks > 0) writes nothing."""

    def __init__(self, path: str | os.PathLike | None, *, enabled: bool = True, append: bool = False) -> None:
        """`append=True` adds to an existing run's log (offline evaluation) instead of starting a new run."""
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and path is not None
        self._handler: logging.FileHandler | None = None
        self._mllog: Any = None
        self._run_stopped = False
        if not self.enabled:
            return
        from mlperf_logging.mllog.mllog import MLLogger

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists() and self.path.stat().st_size > 0:
            # A resumed run is a new MLPerf run: keep the earlier log beside it instead of appending a
            # second run_start to it (the checker wants exactly one). Never over an earlier piece of the same second.
            stamp = f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            aside = self.path.with_name(stamp)
            for n in itertools.count(1):
                if not aside.exists():
                    break
                aside = aside.with_name(f"{stamp}-{n}")
            self.path.rename(aside)
        # A private python logger per instance: mllog's module-level default would add a handler per
        # run to one global logger (tests build many runs in one process).
        pylog = logging.getLogger(f"sd_mlperf.mllog.{next(_instance_ids)}")
        pylog.propagate = False
        pylog.setLevel(logging.INFO)
        self._handler = _LoudFileHandler(self.path, mode="a" if append else "w", encoding="utf-8")
        pylog.addHandler(self._handler)
        self._mllog = MLLogger(logger=pylog, default_stack_offset=3)

    # -- low level -------------------------------------------------------------------------------
    def event(self, key: str, value: Any = None, metadata: dict | None = None, time_ms: int | None = None) -> None:
        """A point-in-time event."""
        if self.enabled:
            self._mllog.event(key=key, value=value, metadata=metadata, time_ms=time_ms)

    def start(self, key: str, value: Any = None, metadata: dict | None = None, time_ms: int | None = None) -> None:
        """The start of an interval."""
        if self.enabled:
            self._mllog.start(key=key, value=value, metadata=metadata, time_ms=time_ms)

    def end(self, key: str, value: Any = None, metadata: dict | None = None, time_ms: int | None = None) -> None:
        """The end of an interval."""
        if self.enabled:
            self._mllog.end(key=key, value=value, metadata=metadata, time_ms=time_ms)

    # -- the run, in order ---------------------------------------------------------------------------
    def init_start(self, time_ms: int | None = None, *, cache_cleared: bool) -> None:
        """Start of initialisation; `time_ms` may be the process start, taken before imports.

        `cache_cleared`: whether the page cache was dropped before the run (by the launcher); logged as is.
        """
        self.event("cache_clear", bool(cache_cleared))
        self.start("init_start", time_ms=time_ms)

    def resumed(self, checkpoint: str, samples_count: int) -> None:
        """Mark this run as resumed from a checkpoint (not a valid timed run)."""
        self.event(RESUMED_KEY, str(checkpoint), metadata={"samples_count": samples_count})

    def submission(self, cfg: Config) -> None:
        """The submission keys (exactly once each)."""
        self.event("submission_benchmark", "stable_diffusion")
        self.event("submission_division", cfg.run.division)
        self.event("submission_org", cfg.run.submission_org)
        self.event("submission_platform", cfg.run.submission_platform)
        self.event("submission_status", cfg.run.submission_status)

    def hyperparameters(self, cfg: Config, *, global_batch_size: int) -> None:
        """Dataset sizes, seed, batch and optimizer keys (exactly once each)."""
        for key, value in logged_hyperparameters(cfg, global_batch_size).items():
            self.event(key, value)

    def run_start(self, samples_count: int = 0) -> None:
        """End of initialisation and start of the timed run."""
        self.end("init_stop")
        self.start("run_start", metadata={"samples_count": samples_count})

    def block_start(self, samples_count: int) -> None:
        """Start of a training block (the images between two evaluations)."""
        self.start("block_start", metadata={"samples_count": samples_count})

    def block_stop(self, samples_count: int) -> None:
        """End of a training block."""
        self.end("block_stop", metadata={"samples_count": samples_count})

    def eval_start(self, samples_count: int, time_ms: int | None = None, *, step: int | None = None) -> None:
        """Start of an evaluation (`step`: the evaluated checkpoint's step, logged as step_num)."""
        self.start("eval_start", metadata=_counts(samples_count, step), time_ms=time_ms)

    def eval_result(self, samples_count: int, fid: float, clip: float, time_ms: int | None = None, *,
                    step: int | None = None) -> None:
        """One eval_accuracy line per metric (the checker aggregates them by samples_count)."""
        self.event("eval_accuracy", float(fid), metadata={**_counts(samples_count, step), "metric": "FID"},
                   time_ms=time_ms)
        self.event("eval_accuracy", float(clip), metadata={**_counts(samples_count, step), "metric": "CLIP"},
                   time_ms=time_ms)

    def eval_stop(self, samples_count: int, time_ms: int | None = None, *, step: int | None = None) -> None:
        """End of an evaluation."""
        self.end("eval_stop", metadata=_counts(samples_count, step), time_ms=time_ms)

    def run_stop(self, samples_count: int, *, success: bool, time_ms: int | None = None,
                 step: int | None = None) -> None:
        """End of the run, once: status success (target reached) or aborted."""
        if self._run_stopped:
            return
        self._run_stopped = True
        self.end("run_stop", metadata={"status": "success" if success else "aborted",
                                       **_counts(samples_count, step)}, time_ms=time_ms)

    def close(self) -> None:
        """Flush and close the file."""
        if self._handler is not None:
            self._handler.close()
            self._handler = None
            self.enabled = False
