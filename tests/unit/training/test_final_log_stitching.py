"""A resumed run's training log: its pieces (moved aside at each restart) found, ordered and stitched into one."""

from __future__ import annotations

import json
import os

from sd_mlperf.training.final_log import MLLOG_TOKEN, Score, compose_final_log, log_pieces, training_log_lines
from sd_mlperf.training.mlperf_log import RESUMED_KEY

PLAIN = "plain text, not an MLLOG line"


def _line(key: str, time_ms: int, samples_count: int | None = None) -> str:
    metadata = {} if samples_count is None else {"samples_count": samples_count}
    return MLLOG_TOKEN + json.dumps({"namespace": "", "time_ms": time_ms, "event_type": "POINT_IN_TIME", "key": key,
                                     "value": None, "metadata": metadata})


def _piece(base: int, resumed_at: int | None, first: int, blocks: int, *, mark_after_run_start: bool = False):
    """One start's log: init lines (times base+0, +1), the resume mark, run_start (base+2), then `blocks` blocks of
    100 samples from `first` (block_start at base+10+2i, block_stop at base+11+2i) and an interrupted block_start."""
    mark = [] if resumed_at is None else [_line(RESUMED_KEY, base + 5, resumed_at)]
    run = [_line("run_start", base + 2, first)]
    lines = [_line("cache_clear", base), _line("submission_benchmark", base + 1)]
    lines += run + mark if mark_after_run_start else mark + run
    for i in range(blocks):
        lines += [_line("block_start", base + 10 + 2 * i, first + 100 * i),
                  _line("block_stop", base + 11 + 2 * i, first + 100 * (i + 1))]
    return lines + [_line("block_start", base + 10 + 2 * blocks, first + 100 * blocks)]


def _write(path, lines, mtime_s: int | None = None):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


def _keys(lines):
    out = []
    for line in lines:
        r = json.loads(line.split(MLLOG_TOKEN, 1)[1]) if MLLOG_TOKEN in line else None
        out.append(line if r is None else (r["key"], r["time_ms"], r["metadata"].get("samples_count")))
    return out


def test_pieces_are_the_files_moved_aside_oldest_first_by_mtime_then_name(tmp_path):
    log = tmp_path / "mlperf_train.log"
    _write(log, ["current"])
    (tmp_path / "mlperf_train.log.d").mkdir()  # not a file
    _write(tmp_path / "other.log.20260101-000000", ["another log"])
    a, b = tmp_path / "mlperf_train.log.20260102-000000", tmp_path / "mlperf_train.log.20260101-000000"
    # Both orders of the same two names: whatever order the directory lists them in, mtime decides.
    for older, newer in ((a, b), (b, a)):
        _write(older, ["older"], mtime_s=1_000)
        _write(newer, ["newer"], mtime_s=2_000)
        assert log_pieces(log) == [older, newer]
    c = _write(tmp_path / "mlperf_train.log.20260101-000000-1", ["same second"], mtime_s=2_000)
    assert log_pieces(str(log)) == [b, c, a]  # c and a share a time: by name
    assert log_pieces(tmp_path / "none.log") == []


def test_a_resumed_log_continues_its_earlier_piece_from_the_resume_point(tmp_path):
    earlier = [PLAIN, *_piece(100, None, 0, 2)]  # trained blocks 0-100 and 100-200, stopped in block 200
    _write(tmp_path / "mlperf_train.log.20260101-000000", earlier, mtime_s=1_000)
    log = _write(tmp_path / "mlperf_train.log", _piece(200, 100, 100, 2))  # resumed at 100: 100-200 trained again
    assert _keys(training_log_lines(log)) == [
        PLAIN, ("cache_clear", 100, None), ("submission_benchmark", 101, None), (RESUMED_KEY, 205, 100),
        ("run_start", 102, 0), ("block_start", 110, 0), ("block_stop", 111, 100),
        ("block_start", 210, 100), ("block_stop", 211, 200), ("block_start", 212, 200), ("block_stop", 213, 300),
        ("block_start", 214, 300)]


def test_four_pieces_stitch_in_order_and_every_resume_mark_goes_before_run_start(tmp_path):
    pieces = [_piece(100, None, 0, 2), _piece(200, 100, 100, 2, mark_after_run_start=True),
              _piece(300, 200, 200, 2), _piece(400, 300, 300, 2)]
    names = ["20260101-000000", "20260101-000000-1", "20260101-000001", None]
    for i, (name, lines) in enumerate(zip(names, pieces)):
        log = _write(tmp_path / ("mlperf_train.log" + (f".{name}" if name else "")), lines, mtime_s=1_000 + i)
    assert _keys(training_log_lines(log)) == [
        ("cache_clear", 100, None), ("submission_benchmark", 101, None),
        (RESUMED_KEY, 205, 100), (RESUMED_KEY, 305, 200), (RESUMED_KEY, 405, 300),
        ("run_start", 102, 0), ("block_start", 110, 0), ("block_stop", 111, 100),
        ("block_start", 210, 100), ("block_stop", 211, 200),
        ("block_start", 310, 200), ("block_stop", 311, 300),
        ("block_start", 410, 300), ("block_stop", 411, 400), ("block_start", 412, 400), ("block_stop", 413, 500),
        ("block_start", 414, 500)]


def test_a_fresh_start_or_a_resume_without_its_earlier_piece_is_read_as_it_is(tmp_path):
    log = tmp_path / "mlperf_train.log"
    fresh = _write(log, _piece(200, None, 0, 1))  # a new run: the earlier log beside it is another run's
    assert training_log_lines(fresh) == _piece(200, None, 0, 1)
    _write(tmp_path / "mlperf_train.log.20260101-000000", _piece(100, None, 0, 2), mtime_s=1_000)
    assert training_log_lines(fresh) == _piece(200, None, 0, 1)
    other = tmp_path / "other"
    other.mkdir()
    alone = _write(other / "mlperf_train.log", _piece(300, 100, 100, 1))  # resumed; the earlier piece is gone
    assert training_log_lines(alone) == _piece(300, 100, 100, 1)


def test_a_resume_mark_without_samples_count_resumes_at_zero(tmp_path):
    _write(tmp_path / "mlperf_train.log.20260101-000000", _piece(100, None, 0, 2), mtime_s=1_000)
    current = [_line(RESUMED_KEY, 205), *_piece(200, None, 0, 1)]
    log = _write(tmp_path / "mlperf_train.log", current)
    assert _keys(training_log_lines(log)) == [
        ("cache_clear", 100, None), ("submission_benchmark", 101, None), (RESUMED_KEY, 205, None),
        ("run_start", 102, 0), ("block_start", 210, 0), ("block_stop", 211, 100), ("block_start", 212, 100)]


def test_the_cut_is_the_first_block_start_that_counts_at_or_past_the_resume_point(tmp_path):
    # A block_start without samples_count counts as 0: at a resume point of 1 the cut is the next one (100).
    earlier = [_line("run_start", 100), _line("block_start", 101), _line("block_stop", 102, 100),
               _line("block_start", 103, 100), _line("block_stop", 104, 200)]
    _write(tmp_path / "mlperf_train.log.20260101-000000", earlier, mtime_s=1_000)
    log = _write(tmp_path / "mlperf_train.log", [_line(RESUMED_KEY, 200, 1), _line("run_start", 201, 1),
                                                  _line("block_stop", 202, 100)])
    assert _keys(training_log_lines(log)) == [
        (RESUMED_KEY, 200, 1), ("run_start", 100, None), ("block_start", 101, None), ("block_stop", 102, 100),
        ("block_stop", 202, 100)]


def test_an_earlier_piece_that_ends_before_the_resume_point_and_never_started_is_kept_whole(tmp_path):
    # Resumed (by path) at 300 after a start that died in init: no run_start, no block_start to cut at.
    _write(tmp_path / "mlperf_train.log.20260101-000000", [PLAIN, _line("cache_clear", 100)], mtime_s=1_000)
    log = _write(tmp_path / "mlperf_train.log", _piece(200, 300, 300, 1))
    assert _keys(training_log_lines(log)) == [
        (RESUMED_KEY, 205, 300), PLAIN, ("cache_clear", 100, None),
        ("block_start", 210, 300), ("block_stop", 211, 400), ("block_start", 212, 400)]


def test_the_final_log_of_a_resumed_run_places_checkpoints_of_every_piece(tmp_path):
    _write(tmp_path / "mlperf_train.log.20260101-000000", _piece(100, None, 0, 2), mtime_s=1_000)
    log = _write(tmp_path / "mlperf_train.log", _piece(200, 100, 100, 2))
    scores = [Score(1, 100, 111, 95.0, 0.2), Score(3, 300, 213, 80.0, 0.2)]  # one from each piece
    lines = compose_final_log(log, scores, target_fid=90.0, target_clip=0.15, training_end=None)
    keys = _keys(lines)
    assert keys.index((RESUMED_KEY, 205, 100)) < keys.index(("run_start", 102, 0))
    assert [k for k in keys if k[0] in ("eval_start", "run_stop")] == [
        ("eval_start", 111, 100), ("eval_start", 213, 300), ("run_stop", 213, 300)]
