"""Weights-only checkpoints collected for offline evaluation, and the stop request of a watching evaluator.

MLPerf's Stable Diffusion rules collect a checkpoint every 512,000 images and score them after training
(offline; the evaluation time is not counted). With `eval.inline=false` the trainer collects the UNet
weights at every block end into `RUN/eval_checkpoints/`:

    step_0000010.pt   {"unet": fp32 state dict, "step", "samples_count", "collected_ms", "global_batch_size",
                       "seed", "format"}
    index.jsonl       one line per published checkpoint: {"step", "samples_count", "collected_ms", "file"};
                      and {"event": "training_end", "samples_count", "time_ms", "reason"} when training stops

`collected_ms` is when the weights were taken: `sd-mlperf evaluate --run-dir` places run_stop there for
the first passing checkpoint. The weights are copied to host memory at once (training goes on changing
them) and written to disk by a background thread, so the file write stays off the training loop; at
most one write is in flight, so host memory holds at most two copies. A failed write is raised at the
next collection or at `finish`, never dropped. A checkpoint file appears under its final name only when
complete, and its index line only after that, so a watching evaluator never reads a partial file.

`RUN/STOP` is the stop request: `sd-mlperf evaluate --watch` writes it once a checkpoint reaches the
target, and the trainer stops at its next block end.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.files import atomic_path
from sd_mlperf.utils.logging import logger

EVAL_CHECKPOINT_DIR = "eval_checkpoints"
INDEX_FILE = "index.jsonl"
STOP_FILE = "STOP"
FORMAT = 1


def eval_checkpoint_name(step: int) -> str:
    """`step_0000010.pt` for step 10."""
    return f"step_{step:07d}.pt"


def stop_requested(run_dir: str | os.PathLike) -> bool:
    """Whether an evaluator asked this run to stop (RUN/STOP exists)."""
    return (Path(run_dir) / STOP_FILE).exists()


def request_stop(run_dir: str | os.PathLike, reason: str) -> Path:
    """Ask the run's trainer to stop at its next block end (atomically written, with the reason)."""
    path = Path(run_dir) / STOP_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(reason + "\n", encoding="utf-8")
    return path


def read_index(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(published checkpoints in step order, the training_end record or None) of a run's index.

    A partial last line (the trainer writing it right now) is ignored; it is complete at the next read.
    """
    path = Path(run_dir) / EVAL_CHECKPOINT_DIR / INDEX_FILE
    checkpoints: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    if not path.is_file():
        return checkpoints, end
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        record = json.loads(line)
        if record.get("event") == "training_end":
            end = record
        else:
            checkpoints.append(record)
    checkpoints.sort(key=lambda r: r["step"])
    return checkpoints, end


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


class EvalCheckpointWriter:
    """Collects weights-only checkpoints (rank 0 writes; other ranks call it too and do nothing)."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, background: bool = True) -> None:
        self.dir = Path(run_dir) / EVAL_CHECKPOINT_DIR
        self.enabled = enabled
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def collect(self, step: int, samples_count: int, unet_state: Mapping[str, torch.Tensor], *,
                global_batch_size: int, seed: int) -> None:
        """Take the weights now (host copy) and publish them as a checkpoint (in the background)."""
        if not self.enabled:
            return
        self._wait()  # one write in flight at most: bounds host memory, and keeps the index in step order
        # A copy, not a view: training changes the weights while the file is written.
        state = {k: v.detach().to("cpu", copy=True) for k, v in unet_state.items()}
        collected_ms = int(time.time() * 1e3)  # after the copy: the timed run includes taking the weights
        payload = {"unet": state, "step": step, "samples_count": samples_count, "collected_ms": collected_ms,
                   "global_batch_size": global_batch_size, "seed": seed, "format": FORMAT}
        if self.background:
            self._thread = threading.Thread(target=self._write_guarded, args=(payload,), daemon=False,
                                            name=f"eval-checkpoint-{step}")
            self._thread.start()
        else:
            self._write(payload)

    def finish(self, samples_count: int, reason: str) -> None:
        """Wait for the last write and record the end of training (then evaluators know nothing more comes)."""
        if not self.enabled:
            return
        self._wait()
        _append_line(self.dir / INDEX_FILE, {"event": "training_end", "samples_count": samples_count,
                                             "time_ms": int(time.time() * 1e3), "reason": reason})

    def close(self) -> None:
        """Wait for a write in flight (an error is logged here: close runs while another error may unwind)."""
        try:
            self._wait()
        except Exception as exc:  # raised already where it could be; do not hide the original error
            logger.error("writing an evaluation checkpoint failed: %s", exc)

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise UserError(f"writing an evaluation checkpoint into {self.dir} failed: {error}") from error

    def _write_guarded(self, payload: dict[str, Any]) -> None:
        try:
            self._write(payload)
        except BaseException as exc:  # re-raised on the training thread by _wait
            self._error = exc

    def _write(self, payload: dict[str, Any]) -> None:
        name = eval_checkpoint_name(payload["step"])
        with atomic_path(self.dir / name) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        _append_line(self.dir / INDEX_FILE, {"step": payload["step"], "samples_count": payload["samples_count"],
                                             "collected_ms": payload["collected_ms"], "file": name})
        logger.info("collected evaluation checkpoint %s (step %d, %d samples)", self.dir / name, payload["step"],
                    payload["samples_count"])
