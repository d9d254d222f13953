"""The final MLPerf log of a run evaluated offline, laid out as the real v5.0 offline-evaluated results are.

MLPerf's Stable Diffusion rules collect a checkpoint every 512,000 images and score them after training;
the evaluation time is not counted. The result summarizer times run_start..run_stop, and the RCP checker
takes the samples_count of the first passing eval_accuracy before a run_stop with status success. As in the
v5.0 results (e.g. NVIDIA's nyx_n1_ngc25.04_nemo, tests/fixtures/mlperf_v5.0/), the final log holds, in the
order things happened:
- the whole training log (mlperf_train.log), through the end of training: the blocks after the first passing
  checkpoint stay (they ran; they are not timed, since run_stop is back-dated);
- each scored checkpoint up to the first passing one, in the order it was evaluated: eval_start, eval_accuracy
  (FID, CLIP), eval_stop, stamped with the times the evaluation really ran (the scores' records) and with the
  checkpoint's samples_count and step_num;
- run_stop last, back-dated to the first passing checkpoint's collection time (the end of its block), with
  status success, samples_count and step_num.
Without a passing checkpoint, once training has ended, every score is kept and run_stop (aborted) is stamped
with the end of training.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_mlperf.training.mlperf_log import RESUMED_KEY, MLPerfLogger

MLLOG_TOKEN = ":::MLLOG "


@dataclass(frozen=True)
class Score:
    """FID and CLIP (and toy metrics) of one collected checkpoint, and when it was collected and scored."""

    step: int
    samples_count: int
    collected_ms: int
    fid: float
    clip: float
    extra: dict[str, float] = field(default_factory=dict)
    """Toy metrics of synthetic runs (sd_mlperf.eval.toy_metrics), checked against training.target_toy."""
    eval_start_ms: int | None = None
    """When its evaluation started and ended (wall clock); None in records written before these were kept."""
    eval_stop_ms: int | None = None

    def passes(self, target_fid: float, target_clip: float, target_toy: dict[str, float] | None = None) -> bool:
        """The quality target: FID <= target_fid, CLIP >= target_clip and each toy metric >= its target."""
        return (self.fid <= target_fid and self.clip >= target_clip
                and all(self.extra.get(k, -math.inf) >= v for k, v in (target_toy or {}).items()))

    @property
    def eval_times_ms(self) -> tuple[int, int]:
        """(start, stop) of the evaluation; the collection time for records that do not say."""
        start = self.eval_start_ms if self.eval_start_ms is not None else self.collected_ms
        return start, self.eval_stop_ms if self.eval_stop_ms is not None else start


def score_of_record(record: dict[str, Any]) -> Score:
    """The Score a scores.jsonl record holds (records of older versions lack the toy metrics and eval times)."""
    return Score(int(record["step"]), int(record["samples_count"]), int(record["collected_ms"]), float(record["fid"]),
                 float(record["clip"]), dict(record.get("extra") or {}), record.get("eval_start_ms"),
                 record.get("eval_stop_ms"))


def parse_mllog_line(line: str) -> dict[str, Any] | None:
    """The JSON record of a `:::MLLOG {...}` line, or None for any other line."""
    if MLLOG_TOKEN not in line:
        return None
    return json.loads(line.split(MLLOG_TOKEN, 1)[1])


def first_passing(scores: list[Score], target_fid: float, target_clip: float,
                  target_toy: dict[str, float] | None = None) -> Score | None:
    """The passing score of the fewest samples, or None."""
    passing = [s for s in scores if s.passes(target_fid, target_clip, target_toy)]
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
    start_ms, stop_ms = score.eval_times_ms
    count, step = score.samples_count, score.step

    def write(mlperf: MLPerfLogger) -> None:
        mlperf.eval_start(count, time_ms=start_ms, step=step)
        mlperf.eval_result(count, score.fid, score.clip, time_ms=stop_ms, step=step)
        mlperf.eval_stop(count, time_ms=stop_ms, step=step)

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
                      target_clip: float, training_end: tuple[int, int] | None,
                      target_toy: dict[str, float] | None = None) -> list[str]:
    """The lines of the final log (see the module docstring). Raises ValueError when it cannot be written yet.

    `training_end` is (samples_count, time_ms) of the end of training, or None while it still runs.
    """
    training_log = Path(training_log)
    if not training_log.is_file():
        raise FileNotFoundError(f"{training_log} does not exist: the run directory holds no training log of an "
                                "offline-evaluated run (eval.inline=false)")
    first = first_passing(scores, target_fid, target_clip, target_toy)
    if first is None and training_end is None:
        raise ValueError("no collected checkpoint reaches the target yet and training has not ended: the final log "
                         "cannot be written yet (wait for more checkpoints, or use --watch)")
    kept = [s for s in scores if first is None or s.samples_count <= first.samples_count]
    out: list[str] = []
    block_stops: set[int] = set()
    for line in training_log_lines(training_log):
        record = parse_mllog_line(line)
        key = record.get("key") if record else None
        if key == "run_stop":
            raise ValueError(f"{training_log} already holds a run_stop: it is not the training part of an "
                             "offline-evaluated run")
        if key == "block_stop":
            block_stops.add((record.get("metadata") or {}).get("samples_count"))
        out.append(line)
    missing = sorted(s.samples_count for s in kept if s.samples_count not in block_stops)
    if missing:
        raise ValueError(f"scored checkpoints at samples_count {missing} have no block_stop in {training_log}: "
                         "the checkpoints and the log are of different runs")
    for score in sorted(kept, key=lambda s: (s.eval_times_ms, s.samples_count)):  # the order they ran in
        out += _eval_lines(score)
    if first is not None:
        stop_ms, stop_count, stop_step, success = first.collected_ms, first.samples_count, first.step, True
    else:
        assert training_end is not None
        (stop_count, stop_ms), stop_step, success = training_end, None, False
    out += _event_lines(lambda m: m.run_stop(stop_count, success=success, time_ms=stop_ms, step=stop_step))
    return out
