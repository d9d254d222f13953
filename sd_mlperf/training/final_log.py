"""The final MLPerf log of a run evaluated offline: its training log, the scored checkpoints, and run_stop.

MLPerf's Stable Diffusion rules collect a checkpoint every 512,000 images and score them after training;
the evaluation time is not counted. The result summarizer times run_start..run_stop, and the RCP checker
takes the samples_count of the first passing eval_accuracy before a run_stop with status success. So the
final log holds:
- the training log (mlperf_train.log) up to the block_stop of the block that produced the first passing
  checkpoint (later blocks are not part of the timed run);
- after each scored checkpoint's block_stop, its eval_start / eval_accuracy (FID, CLIP) / eval_stop, stamped
  with the time the checkpoint was collected (the evaluation itself took no timed time);
- run_stop (success) at the time the first passing checkpoint was collected.
Without a passing checkpoint, once training has ended, it keeps the whole training log and every score and
ends with run_stop (aborted) at the end of training.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_mlperf.training.mlperf_log import RESUMED_KEY, MLPerfLogger

MLLOG_TOKEN = ":::MLLOG "


@dataclass(frozen=True)
class Score:
    """FID and CLIP of one collected checkpoint."""

    step: int
    samples_count: int
    collected_ms: int
    fid: float
    clip: float

    def passes(self, target_fid: float, target_clip: float) -> bool:
        """The MLPerf quality target: FID <= target_fid and CLIP >= target_clip."""
        return self.fid <= target_fid and self.clip >= target_clip


def parse_mllog_line(line: str) -> dict[str, Any] | None:
    """The JSON record of a `:::MLLOG {...}` line, or None for any other line."""
    if MLLOG_TOKEN not in line:
        return None
    return json.loads(line.split(MLLOG_TOKEN, 1)[1])


def first_passing(scores: list[Score], target_fid: float, target_clip: float) -> Score | None:
    """The passing score of the fewest samples, or None."""
    passing = [s for s in scores if s.passes(target_fid, target_clip)]
    return min(passing, key=lambda s: s.samples_count) if passing else None


def _event_lines(write: Any) -> list[str]:
    """Lines that `write(logger)` produces with our MLPerfLogger (caller file/line metadata and all)."""
    fd, tmp = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    try:
        mlperf = MLPerfLogger(tmp, append=True)
        try:
            write(mlperf)
        finally:
            mlperf.close()
        return Path(tmp).read_text(encoding="utf-8").splitlines()
    finally:
        os.unlink(tmp)


def _eval_lines(score: Score) -> list[str]:
    def write(mlperf: MLPerfLogger) -> None:
        mlperf.eval_start(score.samples_count, time_ms=score.collected_ms)
        mlperf.eval_result(score.samples_count, score.fid, score.clip, time_ms=score.collected_ms)
        mlperf.eval_stop(score.samples_count, time_ms=score.collected_ms)

    return _event_lines(write)


def append_eval_lines(log_path: str | os.PathLike, samples_count: int, fid: float, clip: float) -> Path:
    """Append one evaluation's eval_start / eval_accuracy (FID, CLIP) / eval_stop to an MLPerf log (not a final one)."""
    mlperf = MLPerfLogger(log_path, append=True)
    try:
        mlperf.eval_start(samples_count)
        mlperf.eval_result(samples_count, fid, clip)
        mlperf.eval_stop(samples_count)
    finally:
        mlperf.close()
    return Path(log_path)


def _resume_point(lines: list[str]) -> int | None:
    """The samples_count a log piece resumed at (its sd_mlperf_resumed mark), or None for a fresh start."""
    for line in lines:
        record = parse_mllog_line(line)
        if record and record.get("key") == RESUMED_KEY:
            return int((record.get("metadata") or {}).get("samples_count", 0))
    return None


def log_pieces(training_log: str | os.PathLike) -> list[Path]:
    """The earlier pieces of a training log, oldest first: each start of a resumed run moves the log it finds
    aside as LOG.YYYYmmdd-HHMMSS[-N] (sd_mlperf.training.mlperf_log)."""
    training_log = Path(training_log)
    pieces = [p for p in training_log.parent.glob(f"{training_log.name}.*") if p.is_file()]
    return sorted(pieces, key=lambda p: (p.stat().st_mtime_ns, p.name))


def training_log_lines(training_log: str | os.PathLike) -> list[str]:
    """The training log of a run, its resumed pieces stitched (a run resumed by path leaves one piece per start).

    Each resumed piece continues the piece before it: that piece's lines up to the block_start at the resume
    point (the blocks from there on were trained again), then the resumed piece's lines after its run_start; its
    init, submission and hyperparameter lines and its run_start, repeated by the restart, are left out. Its
    resume mark moves before run_start: the rules still see a resumed run, and `sd-mlperf package` refuses it
    for a timed result, however early the final log ends.
    """
    return _stitched(Path(training_log).read_text(encoding="utf-8").splitlines(), log_pieces(training_log))


def _stitched(lines: list[str], older: list[Path]) -> list[str]:
    at = _resume_point(lines)
    if at is None or not older:
        return lines  # a fresh start; or its earlier piece is gone (compose_final_log names what it cannot place)
    head = _stitched(older[-1].read_text(encoding="utf-8").splitlines(), older[:-1])
    cut = next((i for i, line in enumerate(head) if (r := parse_mllog_line(line)) and r.get("key") == "block_start"
                and (r.get("metadata") or {}).get("samples_count", 0) >= at), len(head))
    marks, tail, started = [], [], False
    for line in lines:
        key = (parse_mllog_line(line) or {}).get("key")
        if key == RESUMED_KEY:
            marks.append(line)
        elif started:
            tail.append(line)
        started = started or key == "run_start"
    # The resume marks go before run_start, where a resumed run's own log has them: a final log cut at an
    # earlier passing checkpoint still says resumed.
    start = next((i for i, line in enumerate(head) if (parse_mllog_line(line) or {}).get("key") == "run_start"), 0)
    return head[:start] + marks + head[start:cut] + tail


def compose_final_log(training_log: str | os.PathLike, scores: list[Score], *, target_fid: float,
                      target_clip: float, training_end: tuple[int, int] | None) -> list[str]:
    """The lines of the final log (see the module docstring). Raises ValueError when it cannot be written yet.

    `training_end` is (samples_count, time_ms) of the end of training, or None while it still runs.
    """
    training_log = Path(training_log)
    if not training_log.is_file():
        raise FileNotFoundError(f"{training_log} does not exist: the run directory holds no training log of an "
                                "offline-evaluated run (eval.inline=false)")
    first = first_passing(scores, target_fid, target_clip)
    if first is None and training_end is None:
        raise ValueError("no collected checkpoint reaches the target yet and training has not ended: the final log "
                         "cannot be written yet (wait for more checkpoints, or use --watch)")
    kept = {s.samples_count: s for s in scores if first is None or s.samples_count <= first.samples_count}
    out: list[str] = []
    placed: set[int] = set()
    for line in training_log_lines(training_log):
        record = parse_mllog_line(line)
        key = record.get("key") if record else None
        count = (record.get("metadata") or {}).get("samples_count") if record else None
        if key == "run_stop":
            raise ValueError(f"{training_log} already holds a run_stop: it is not the training part of an "
                             "offline-evaluated run")
        if first is not None and key == "block_start" and count is not None and count >= first.samples_count:
            break
        out.append(line)
        if key == "block_stop" and count in kept:
            out += _eval_lines(kept[count])
            placed.add(count)
        if first is not None and key == "block_stop" and count == first.samples_count:
            break
    missing = sorted(set(kept) - placed)
    if missing:
        raise ValueError(f"scored checkpoints at samples_count {missing} have no block_stop in {training_log}: "
                         "the checkpoints and the log are of different runs")
    if first is not None:
        stop_ms, stop_count, success = first.collected_ms, first.samples_count, True
    else:
        assert training_end is not None
        (stop_count, stop_ms), success = training_end, False
    out += _event_lines(lambda m: m.run_stop(stop_count, success=success, time_ms=stop_ms))
    return out
