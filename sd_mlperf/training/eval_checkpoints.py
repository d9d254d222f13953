"""Weights-only checkpoints collected for offline evaluation, and the stop request of a watching evaluator.

MLPerf's Stable Diffusion rules collect a checkpoint every 512,000 images and score them after training
(offline; the evaluation time is not counted). With `eval.inline=false` the trainer collects the UNet
weights at every block end into `RUN/eval_checkpoints/`:

    step_0000010.pt   {"unet": fp32 state dict, "step", "samples_count", "collected_ms", "global_batch_size",
                       "seed", "format"}
    index.jsonl       one line per published checkpoint: {"step", "samples_count", "collected_ms", "file",
                      "sha256", "bytes"} (the checksum taken while writing: a reader verifies the file with it);
                      {"event": "resume", "step", "samples_count"} when a resumed trainer continues (records of
                      later steps before it are superseded); {"event": "training_end", "samples_count",
                      "time_ms", "reason"} when training stops (reason max_steps, stop_requested, target,
                      interrupted or error)
    heartbeat.json    {"pid", "host", "time"}, refreshed every few seconds while the trainer lives, so that
                      `evaluate --watch` notices a trainer that died without recording its end

`collected_ms` is when the weights were taken: `sd-mlperf evaluate --run-dir` places run_stop there for
the first passing checkpoint. The weights are copied to host memory at once (training goes on changing
them) and written to disk by a background thread, so the file write stays off the training loop; at
most one write is in flight, so host memory holds at most two copies. A failed write is raised at the
next collection or at `finish`, never dropped. A checkpoint file appears under its final name only when
complete, and its index line only after that, so a watching evaluator never reads a partial file.
A kill can leave a temporary file (removed at the next start) or a published file without its index line
(removed at the next start; a resume collects its step again, see `EvalCheckpointWriter.resume`). The trainer
waits for a collection to be durable before its next resumable checkpoint, so at most the newest one is redone.

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

from sd_mlperf.training.checkpoint_files import save_hashed
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.files import atomic_path, atomic_write_text, file_sha256, remove_stale_temporaries, write_error
from sd_mlperf.utils.jsonl import append_jsonl, read_jsonl
from sd_mlperf.utils.lock import holder_record, process_alive
from sd_mlperf.utils.logging import logger

EVAL_CHECKPOINT_DIR = "eval_checkpoints"
INDEX_FILE = "index.jsonl"
STOP_FILE = "STOP"
HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_S = 5.0
"""How often the trainer refreshes heartbeat.json."""
HEARTBEAT_STALE_S = 120.0
"""A heartbeat this old says the trainer is gone when its pid cannot be checked (another host)."""
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


def index_path(run_dir: str | os.PathLike) -> Path:
    """RUN/eval_checkpoints/index.jsonl."""
    return Path(run_dir) / EVAL_CHECKPOINT_DIR / INDEX_FILE


def read_index(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(published checkpoints in step order, the training_end record or None) of a run's index.

    A partial last line (the trainer writing it right now) is ignored; it is complete at the next read. A
    `resume` record supersedes the earlier records of later steps and an earlier training_end: that part of
    the run was trained again. A step collected twice keeps its last record.
    """
    by_step: dict[int, dict[str, Any]] = {}
    end: dict[str, Any] | None = None
    for record in read_jsonl(index_path(run_dir)):
        event = record.get("event")
        if event == "training_end":
            end = record
        elif event == "resume":
            end = None
            by_step = {s: r for s, r in by_step.items() if s <= int(record["step"])}
        else:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)], end


def read_heartbeat(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The trainer's last heartbeat record, or None before it wrote one."""
    path = Path(run_dir) / EVAL_CHECKPOINT_DIR / HEARTBEAT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def trainer_gone(run_dir: str | os.PathLike, stale_s: float = HEARTBEAT_STALE_S) -> str | None:
    """Why the run's trainer is known to be dead (its pid on this host is gone, or its heartbeat is older than
    `stale_s`), or None: alive, or not known yet (no heartbeat written)."""
    import socket

    beat = read_heartbeat(run_dir)
    if beat is None:
        return None
    pid, host, age = int(beat.get("pid", -1)), str(beat.get("host", "")), time.time() - float(beat.get("time", 0))
    if host == socket.gethostname():
        return None if process_alive(pid) else f"the trainer (pid {pid} on this host) is gone"
    if age > stale_s:
        return f"the trainer (pid {pid} on {host}) has not refreshed its heartbeat for {age:.0f} s"
    return None


def load_eval_checkpoint(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> dict[str, Any]:
    """A collected checkpoint's payload, verified against its index record (size, sha256 and step).

    A file truncated or changed after it was written, or one of another step, is an error naming the file.
    """
    path = Path(run_dir) / EVAL_CHECKPOINT_DIR / record["file"]
    where = f"{path} (indexed in {index_path(run_dir)} as step {record['step']})"
    fix = "Delete the file and its index line and resume the run to collect it again, or restore it."
    try:
        size = path.stat().st_size
        if "bytes" in record and size != int(record["bytes"]):
            raise UserError(f"evaluation checkpoint {where} has {size} bytes, {record['bytes']} were written: it is "
                            f"truncated or was replaced. {fix}")
        if "sha256" in record and file_sha256(path) != record["sha256"]:  # streamed: one copy in memory, not two
            raise UserError(f"evaluation checkpoint {where} does not match the sha256 recorded when it was "
                            f"written: it is corrupted or was replaced. {fix}")
    except OSError as exc:
        raise UserError(f"cannot read evaluation checkpoint {where}: {exc.strerror or exc}. {fix}") from exc
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read evaluation checkpoint {where}: {exc}. {fix}") from exc
    if not isinstance(payload, dict) or int(payload.get("step", -1)) != int(record["step"]):
        stored = payload.get("step") if isinstance(payload, dict) else None
        raise UserError(f"evaluation checkpoint {where} stores step {stored}, not the index's {record['step']}. {fix}")
    return payload


class EvalCheckpointWriter:
    """Collects weights-only checkpoints (rank 0 writes; other ranks call it too and do nothing)."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, background: bool = True,
                 heartbeat_s: float | None = HEARTBEAT_S) -> None:
        """`heartbeat_s`: refresh heartbeat.json this often (None: no heartbeat)."""
        self.dir = Path(run_dir) / EVAL_CHECKPOINT_DIR
        self.enabled = enabled
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(self.dir):
            logger.warning("removed %s, left by a collection that a kill interrupted", path)
        self._remove_unindexed()
        if heartbeat_s is not None:
            self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True,
                                          name="eval-checkpoint-heartbeat")
            self._write_heartbeat()
            self._beat.start()

    def _remove_unindexed(self) -> None:
        """A file published but not indexed (killed between the rename and the index line) is removed."""
        records, _ = read_index(self.dir.parent)
        indexed = {r["file"] for r in records}
        for path in sorted(self.dir.glob("step_*.pt")):
            if path.name not in indexed:
                logger.warning("removed %s: published but never indexed (the trainer was killed in between); a "
                               "resume collects its step again", path)
                path.unlink()

    def resume(self, step: int, samples_count: int, unet_state: Mapping[str, torch.Tensor], *, on_cadence: bool,
               global_batch_size: int, seed: int) -> None:
        """A resumed trainer continues at `step`: mark it in the index; collect `step` again if it is missing.

        The resumable checkpoint of a step is saved before that step's collected weights are durable, so a kill
        in between leaves a checkpoint whose collection is missing: the restored weights are that step's.
        """
        if not self.enabled:
            return
        records, _ = read_index(self.dir.parent)
        have = {int(r["step"]) for r in records}
        self._append({"event": "resume", "step": step, "samples_count": samples_count})
        if on_cadence and step not in have:
            logger.warning("evaluation checkpoint of step %d is missing (the trainer was killed before it was "
                           "written): collecting it again from the resumed weights", step)
            self.collect(step, samples_count, unet_state, global_batch_size=global_batch_size, seed=seed)

    def collect(self, step: int, samples_count: int, unet_state: Mapping[str, torch.Tensor], *,
                global_batch_size: int, seed: int) -> None:
        """Take the weights now (host copy) and publish them as a checkpoint (in the background)."""
        if not self.enabled:
            return
        self.wait()  # one write in flight at most: bounds host memory, and keeps the index in step order
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
        try:
            self.wait()
        except BaseException:
            reason = "error"  # the last collection failed: never recorded as a normal end
            raise
        finally:  # the end is recorded even when the last write failed (its error still propagates)
            try:
                self._append({"event": "training_end", "samples_count": samples_count,
                              "time_ms": int(time.time() * 1e3), "reason": reason})
            finally:
                self._stop_heartbeat()

    def close(self) -> None:
        """Wait for a write in flight (an error is logged here: close runs while another error may unwind)."""
        try:
            self.wait()
        except Exception as exc:  # raised already where it could be; do not hide the original error
            logger.error("%s", exc)
        finally:
            self._stop_heartbeat()

    def wait(self) -> None:
        """Until the write in flight is durable (published and indexed); raises its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, UserError):
                raise error
            raise UserError(f"writing an evaluation checkpoint into {self.dir} failed: {error}") from error

    def _append(self, record: Mapping[str, Any]) -> None:
        path = self.dir / INDEX_FILE
        try:
            append_jsonl(path, record)
        except OSError as exc:
            raise write_error(exc, path, "the evaluation checkpoint index") from exc

    def _write_guarded(self, payload: dict[str, Any]) -> None:
        try:
            self._write(payload)
        except BaseException as exc:  # re-raised on the training thread by wait
            self._error = exc

    def _write(self, payload: dict[str, Any]) -> None:
        name = eval_checkpoint_name(payload["step"])
        try:
            with atomic_path(self.dir / name) as tmp:
                writer = save_hashed(payload, tmp)
        except Exception as exc:
            raise write_error(exc, self.dir / name, "evaluation checkpoint") from exc
        self._append({"step": payload["step"], "samples_count": payload["samples_count"],
                      "collected_ms": payload["collected_ms"], "file": name, "sha256": writer.hexdigest(),
                      "bytes": writer.num_bytes})
        logger.info("collected evaluation checkpoint %s (step %d, %d samples)", self.dir / name, payload["step"],
                    payload["samples_count"])

    # -- heartbeat -------------------------------------------------------------------------------
    def _write_heartbeat(self) -> None:
        try:
            atomic_write_text(self.dir / HEARTBEAT_FILE, json.dumps(holder_record()) + "\n")
        except OSError as exc:  # a full disk is reported by the writes that matter
            logger.debug("heartbeat not written: %s", exc)

    def _heartbeat(self, every_s: float) -> None:
        while not self._beat_stop.wait(every_s):
            self._write_heartbeat()

    def _stop_heartbeat(self) -> None:
        self._beat_stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
