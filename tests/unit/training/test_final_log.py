"""Final-log placement: evaluation lines carry their checkpoint's samples_count and time; appending keeps the log."""

from __future__ import annotations

import json

from sd_mlperf.training.final_log import MLLOG_TOKEN, Score, append_eval_lines, compose_final_log


def _line(key: str, time_ms: int, samples_count: int | None = None, value=None) -> str:
    metadata = {} if samples_count is None else {"samples_count": samples_count}
    record = {"namespace": "", "time_ms": time_ms, "event_type": "POINT_IN_TIME", "key": key, "value": value,
              "metadata": metadata}
    return MLLOG_TOKEN + json.dumps(record)


def _events(lines: list[str]) -> list[tuple[str, int | None, int]]:
    records = [json.loads(line.split(MLLOG_TOKEN, 1)[1]) for line in lines if MLLOG_TOKEN in line]
    return [(r["key"], r["metadata"].get("samples_count"), r["time_ms"]) for r in records]


def test_scores_go_after_their_block_with_the_collection_time(tmp_path):
    log = tmp_path / "mlperf_train.log"
    log.write_text("\n".join([_line("run_start", 0), _line("block_start", 10, 0), _line("block_stop", 20, 100),
                              _line("block_start", 30, 100), _line("block_stop", 40, 200),
                              _line("block_start", 50, 200)]) + "\n")
    scores = [Score(step=1, samples_count=100, collected_ms=21, fid=120.0, clip=0.1),
              Score(step=2, samples_count=200, collected_ms=41, fid=80.0, clip=0.2)]
    events = _events(compose_final_log(log, scores, target_fid=90.0, target_clip=0.15, training_end=None))
    assert events == [("run_start", None, 0), ("block_start", 0, 10), ("block_stop", 100, 20),
                      ("eval_start", 100, 21), ("eval_accuracy", 100, 21), ("eval_accuracy", 100, 21),
                      ("eval_stop", 100, 21), ("block_start", 100, 30), ("block_stop", 200, 40),
                      ("eval_start", 200, 41), ("eval_accuracy", 200, 41), ("eval_accuracy", 200, 41),
                      ("eval_stop", 200, 41), ("run_stop", 200, 41)]


def test_append_keeps_what_the_log_holds(tmp_path):
    log = tmp_path / "mlperf.log"
    log.write_text(_line("run_start", 0) + "\n")
    append_eval_lines(log, 64, 95.0, 0.14)
    events = _events(log.read_text().splitlines())
    assert [(k, c) for k, c, _ in events] == [("run_start", None), ("eval_start", 64), ("eval_accuracy", 64),
                                              ("eval_accuracy", 64), ("eval_stop", 64)]
