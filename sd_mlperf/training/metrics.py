"""The run's metrics file, `metrics.jsonl`, and the progress it shows: one log line per interval, a tqdm bar
on a terminal, the same records as JSON lines (and to TensorBoard when asked); `read_metrics` reads them back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from sd_mlperf.config.schema import LoggingConfig
from sd_mlperf.utils.files import write_error
from sd_mlperf.utils.jsonl import repair_torn_tail
from sd_mlperf.utils.logging import logger, show_progress_bar

RESTART_KINDS = ("start", "resume")
"""Records that begin a run's part of metrics.jsonl: a fresh start (step 0) or a resume (step N)."""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, each step once: a restart drops what earlier attempts logged after it.

    Every run appends to the same file, first a `start` (fresh, step 0) or `resume` (step N) record;
    records an earlier attempt wrote for later steps describe steps that were trained again, so they
    are left out here. A line that is not JSON (a run killed mid-write) is skipped with a warning.
    """
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                logger.warning("%s:%d: skipped a line that is not a JSON record (%s; a run killed mid-write leaves "
                               "one)", path, number, exc.msg)
                continue
            if record.get("kind") in RESTART_KINDS:
                records = [r for r in records if r.get("step", 0) <= record["step"]]
            records.append(record)
    return records


@dataclass(frozen=True)
class Hardware:
    """What turns the global img/s into per-GPU img/s, MFU and peak memory; fixed at build time (training.build)."""

    world_size: int = 1
    unit: str = "rank"
    """What one rank drives, for the line: `GPU` on CUDA, else `rank`."""
    flop_per_image: float | None = None
    """Model FLOPs of one trained image, forward + backward (sd_mlperf.models.flops); None: unknown."""
    peak_flop_per_s: float | None = None
    """Dense 16-bit peak of one device; None on the CPU, unknown GPUs and fp32 (MFU n/a)."""
    memory_device: torch.device | None = None
    """The CUDA device whose peak allocated memory is shown; None elsewhere (n/a)."""

    def stats(self, img_per_s: float) -> dict[str, float | None]:
        """Per-GPU img/s, MFU (achieved model FLOP/s over the peak) and peak GPU memory; None = n/a."""
        per_gpu = img_per_s / self.world_size
        mfu = None
        if self.flop_per_image and self.peak_flop_per_s and math.isfinite(per_gpu):
            mfu = per_gpu * self.flop_per_image / self.peak_flop_per_s
        mem = None
        if self.memory_device is not None:
            mem = torch.cuda.max_memory_allocated(self.memory_device) / 2**30  # peak since start, evaluation included
        return {"img_per_s_per_gpu": per_gpu, "mfu": mfu, "peak_mem_gib": mem}


class RecordSink(Protocol):
    """Another destination of every metrics record (the TensorBoard writer, sd_mlperf.utils.tensorboard)."""

    def write(self, record: dict[str, Any]) -> None:
        """Take one record as `metrics.jsonl` gets it."""
        ...

    def close(self) -> None:
        """Flush and close."""
        ...


class Progress:
    """Log line every `logging.interval_steps`, a progress bar on a terminal, metrics in `metrics.jsonl`."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | os.PathLike, *, enabled: bool, total_steps: int | None,
                 global_batch_size: int, start_step: int = 0, stream: IO[str] | None = None,
                 hardware: Hardware | None = None, sinks: Sequence[RecordSink] = ()) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.hardware = hardware or Hardware()
        self.sinks = list(sinks)
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self._file: IO[str] | None = None
        self._bar: Any = None
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._step_time_s = math.nan
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: a resumed run continues the same file. A run killed mid-write can leave a
        # partial last line: cut it (sd_mlperf.utils.jsonl), so no record of this run is glued onto it.
        if repair_torn_tail(self.metrics_path):
            logger.warning("%s ended with a torn line (a killed run): removed it", self.metrics_path)
        self._file = open(self.metrics_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        stream = stream or sys.stderr
        self._stream = stream
        if show_progress_bar(cfg.progress_bar, stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=stream, dynamic_ncols=True)

    def reset_clock(self, step: int) -> None:
        """Restart the throughput clock at `step` (after a resume or a pause)."""
        self._last_time, self._last_step = time.perf_counter(), step
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def tick(self, step: int) -> None:
        """Advance the bar by one step (no device sync)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log_train(self, step: int, samples_count: int, metrics: dict[str, float], *, lr: float, loss_scale: float,
                  steps_to_checkpoint: int) -> dict[str, Any]:
        """Write one progress line and one JSON record; returns the record."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        self._step_time_s = (now - self._last_time) / steps
        self._last_time, self._last_step = now, step
        img_per_s = self.global_batch_size / self._step_time_s if self._step_time_s > 0 else math.nan
        hw = self.hardware.stats(img_per_s)
        record = {"kind": "train", "step": step, "samples": samples_count, **metrics, "lr": lr,
                  "loss_scale": loss_scale, "img_per_s": img_per_s, **hw, "step_time_s": self._step_time_s,
                  "s_to_checkpoint": steps_to_checkpoint * self._step_time_s, "time": time.time()}
        if self.enabled:
            total = self.total_steps or "?"
            mfu = "n/a" if hw["mfu"] is None else f"{100 * hw['mfu']:.1f}%"
            mem = "n/a" if hw["peak_mem_gib"] is None else f"{hw['peak_mem_gib']:.1f} GiB"
            line = (f"step {step}/{total} samples {samples_count} loss {metrics.get('loss', math.nan):.5f} "
                    f"lr {lr:.3e} scale {loss_scale:g} {img_per_s:.1f} img/s "
                    f"({hw['img_per_s_per_gpu']:.1f}/{self.hardware.unit}, MFU {mfu}, peak mem {mem}) "
                    f"next ckpt in {steps_to_checkpoint} steps (~{record['s_to_checkpoint']:.0f} s)")
            if metrics.get("skipped_steps"):
                line += f" skipped {metrics['skipped_steps']}"
            self._write(line, record)
        return record

    def log_eval(self, step: int, samples_count: int, fid: float, clip: float, seconds: float,
                 extra: dict[str, float] | None = None) -> None:
        """Write the evaluation result line and record (`extra`: metrics beside FID and CLIP, e.g. toy metrics)."""
        if self.enabled:
            record = {"kind": "eval", "step": step, "samples": samples_count, "fid": fid, "clip": clip,
                      **(extra or {}), "seconds": seconds, "time": time.time()}
            # The evaluator logs its own result line; this one only goes to the JSON lines.
            self._write(f"eval at step {step} samples {samples_count}: FID {fid:.3f} CLIP {clip:.4f} "
                        f"({seconds:.1f} s)", record, level=logging.DEBUG)
        # Evaluation time is not training time: restart the throughput clock.
        self._last_time = time.perf_counter()

    def log_start(self) -> None:
        """Mark a fresh start (step 0) in the metrics: records of earlier attempts in the file are superseded."""
        if self.enabled:
            self._write("training starts from step 0", {"kind": "start", "step": 0, "samples": 0, "time": time.time()},
                        level=logging.DEBUG)

    def log_resume(self, step: int, samples_count: int, checkpoint: str) -> None:
        """Mark a resume in the metrics: records after it supersede those of later steps before it."""
        if self.enabled:
            self._write(f"resumed from {checkpoint} at step {step}", {"kind": "resume", "step": step,
                        "samples": samples_count, "checkpoint": checkpoint, "time": time.time()}, level=logging.DEBUG)
        self.reset_clock(step)

    def _write(self, line: str, record: dict[str, Any], level: int = logging.INFO) -> None:
        if self._bar is not None and level >= logging.INFO:
            self._bar.write(line, file=self._stream)
        else:
            logger.log(level, line)
        assert self._file is not None
        try:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
        except OSError as exc:
            raise write_error(exc, self.metrics_path, "the metrics file") from exc
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Close the bar, the metrics file and the other sinks."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
