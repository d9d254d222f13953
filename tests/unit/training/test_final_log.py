"""Final-log placement: training lines, then evaluations at the times they ran, then run_stop back-dated."""

from __future__ import annotations

import json

import pytest

from sd_mlperf.training.final_log import (
    MLLOG_TOKEN,
    Score,
    append_eval_lines,
    compose_final_log,
    first_passing,
    parse_mllog_line,
    score_of_record,
)


def _line(key: str, time_ms: int, samples_count: int | None = None, value=None) -> str:
    metadata = {} if samples_count is None else {"samples_count": samples_count}
    record = {"namespace": "", "time_ms": time_ms, "event_type": "POINT_IN_TIME", "key": key, "value": value,
              "metadata": metadata}
    return MLLOG_TOKEN + json.dumps(record)


def _events(lines: list[str]) -> list[tuple[str, int | None, int]]:
    records = [json.loads(line.split(MLLOG_TOKEN, 1)[1]) for line in lines if MLLOG_TOKEN in line]
    return [(r["key"], r["metadata"].get("samples_count"), r["time_ms"]) for r in records]


def test_training_then_evaluations_at_their_times_then_run_stop_back_dated(tmp_path):
    log = tmp_path / "mlperf_train.log"
    log.write_text("\n".join([_line("run_start", 0), _line("block_start", 10, 0), _line("block_stop", 20, 100),
                              _line("block_start", 30, 100), _line("block_stop", 40, 200),
                              _line("block_start", 50, 200)]) + "\n")
    # Bisection scored step 2 (passing) before step 1 (failing): the log keeps the order they ran in.
    scores = [Score(step=1, samples_count=100, collected_ms=21, fid=120.0, clip=0.1, eval_start_ms=80,
                    eval_stop_ms=90),
              Score(step=2, samples_count=200, collected_ms=41, fid=80.0, clip=0.2, eval_start_ms=60,
                    eval_stop_ms=70)]
    events = _events(compose_final_log(log, scores, target_fid=90.0, target_clip=0.15, training_end=None))
    assert events == [("run_start", None, 0), ("block_start", 0, 10), ("block_stop", 100, 20),
                      ("block_start", 100, 30), ("block_stop", 200, 40), ("block_start", 200, 50),
                      ("eval_start", 200, 60), ("eval_accuracy", 200, 70), ("eval_accuracy", 200, 70),
                      ("eval_stop", 200, 70), ("eval_start", 100, 80), ("eval_accuracy", 100, 90),
                      ("eval_accuracy", 100, 90), ("eval_stop", 100, 90), ("run_stop", 200, 41)]


def test_append_keeps_what_the_log_holds(tmp_path):
    log = tmp_path / "mlperf.log"
    log.write_text(_line("run_start", 0) + "\n")
    append_eval_lines(log, 64, 95.0, 0.14)
    events = _events(log.read_text().splitlines())
    assert [(k, c) for k, c, _ in events] == [("run_start", None), ("eval_start", 64), ("eval_accuracy", 64),
                                              ("eval_accuracy", 64), ("eval_stop", 64)]


def _training_log(tmp_path, *lines: str):
    log = tmp_path / "mlperf_train.log"
    log.write_text("\n".join(["not an mllog line", *lines]) + "\n")
    return log


BLOCKS = (_line("run_start", 0), _line("block_start", 10, 0), _line("block_stop", 20, 100),
          _line("block_start", 30, 100), _line("block_stop", 40, 200))


def test_without_a_pass_every_score_is_kept_and_the_run_aborts_at_the_end_of_training(tmp_path):
    log = _training_log(tmp_path, *BLOCKS)
    scores = [Score(1, 200, 41, 95.0, 0.2), Score(0, 100, 21, 91.0, 0.2)]  # out of order, none passing
    lines = compose_final_log(log, scores, target_fid=90.0, target_clip=0.15, training_end=(250, 45))
    assert lines[0] == "not an mllog line"  # other lines of the training log pass through
    keys = [(k, c, t) for k, c, t in _events(lines) if k in ("eval_start", "run_stop")]
    assert keys == [("eval_start", 100, 21), ("eval_start", 200, 41), ("run_stop", 250, 45)]
    stop = json.loads(lines[-1].split(MLLOG_TOKEN, 1)[1])
    assert stop["metadata"]["status"] == "aborted"


def test_the_first_pass_is_the_one_of_fewest_samples_and_ends_the_log(tmp_path):
    log = _training_log(tmp_path, *BLOCKS)
    scores = [Score(1, 200, 41, 80.0, 0.2), Score(0, 100, 21, 90.0, 0.15)]  # both pass (<= and >= count)
    lines = compose_final_log(log, scores, target_fid=90.0, target_clip=0.15, training_end=(250, 45))
    # Training lines to the end (block_stop 200), the first pass's evaluation only, run_stop back-dated to it.
    assert _events(lines)[-6:] == [("block_stop", 200, 40), ("eval_start", 100, 21), ("eval_accuracy", 100, 21),
                                   ("eval_accuracy", 100, 21), ("eval_stop", 100, 21), ("run_stop", 100, 21)]
    assert json.loads(lines[-1].split(MLLOG_TOKEN, 1)[1])["metadata"]["status"] == "success"
    assert first_passing([], 90.0, 0.15) is None
    assert not Score(0, 1, 0, 90.000001, 0.2).passes(90.0, 0.15) and not Score(0, 1, 0, 80.0, 0.1499).passes(90.0, 0.15)


def test_logs_that_cannot_be_composed_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: the run directory holds no training log of an "
                                                r"offline-evaluated run \(eval\.inline=false\)$"):
        compose_final_log(tmp_path / "none.log", [], target_fid=90.0, target_clip=0.15, training_end=None)
    log = _training_log(tmp_path, *BLOCKS)
    with pytest.raises(ValueError, match=r"^no collected checkpoint reaches the target yet and training has not "
                                         r"ended: the final log cannot be written yet"):
        compose_final_log(log, [Score(0, 100, 21, 95.0, 0.2)], target_fid=90.0, target_clip=0.15, training_end=None)
    with pytest.raises(ValueError, match=r"^scored checkpoints at samples_count \[150\] have no block_stop in "):
        compose_final_log(log, [Score(0, 150, 21, 95.0, 0.2)], target_fid=90.0, target_clip=0.15,
                          training_end=(250, 45))
    stopped = _training_log(tmp_path, *BLOCKS, _line("run_stop", 50, 200))
    with pytest.raises(ValueError, match="already holds a run_stop: it is not the training part"):
        compose_final_log(stopped, [], target_fid=90.0, target_clip=0.15, training_end=(250, 45))


def test_mllog_lines_are_split_at_the_first_token_only():
    line = 'INFO prefix ' + MLLOG_TOKEN + json.dumps({"key": "x", "value": "a " + MLLOG_TOKEN + "b"})
    assert parse_mllog_line(line) == {"key": "x", "value": "a " + MLLOG_TOKEN + "b"}
    assert parse_mllog_line("INFO no token here") is None


def test_refusals_end_with_their_explanation(tmp_path):
    stopped = _training_log(tmp_path, *BLOCKS, _line("run_stop", 50, 200))
    with pytest.raises(ValueError, match=r"it is not the training part of an offline-evaluated run$"):
        compose_final_log(stopped, [], target_fid=90.0, target_clip=0.15, training_end=(250, 45))
    log = _training_log(tmp_path, *BLOCKS)
    with pytest.raises(ValueError, match=r": the checkpoints and the log are of different runs$"):
        compose_final_log(log, [Score(0, 150, 21, 95.0, 0.2)], target_fid=90.0, target_clip=0.15,
                          training_end=(250, 45))


def test_a_scores_record_reads_back_as_its_score_and_older_records_default():
    record = {"step": "3", "samples_count": 512000, "collected_ms": "1234", "fid": "80.5", "clip": 0.25,
              "extra": {"toy": 0.9}, "eval_start_ms": 1300, "eval_stop_ms": 1400}
    score = score_of_record(record)
    assert score == Score(3, 512000, 1234, 80.5, 0.25, {"toy": 0.9}, 1300, 1400)
    assert isinstance(score.step, int) and isinstance(score.collected_ms, int) and isinstance(score.fid, float)
    old = {k: record[k] for k in ("step", "samples_count", "collected_ms", "fid", "clip")}
    assert score_of_record(old) == Score(3, 512000, 1234, 80.5, 0.25, {}, None, None)
    assert score_of_record({**old, "extra": None}).extra == {}


def test_toy_targets_need_every_toy_metric_at_or_above_its_target():
    score = Score(0, 100, 0, 80.0, 0.2, {"toy_a": 0.5})
    assert score.passes(90.0, 0.15) and score.passes(90.0, 0.15, {}) and score.passes(90.0, 0.15, {"toy_a": 0.5})
    assert not score.passes(90.0, 0.15, {"toy_a": 0.51})
    assert not score.passes(90.0, 0.15, {"toy_b": -1e9})  # a metric the score lacks never passes
    assert not score.passes(90.0, 0.15, {"toy_a": 0.5, "toy_b": -1e9})


def test_the_first_pass_and_the_final_log_heed_the_toy_target(tmp_path):
    scores = [Score(1, 100, 21, 80.0, 0.2, {"toy": 0.1}), Score(2, 200, 41, 80.0, 0.2, {"toy": 0.9})]
    assert first_passing(scores, 90.0, 0.15).samples_count == 100
    assert first_passing(scores, 90.0, 0.15, {"toy": 0.5}).samples_count == 200
    log = _training_log(tmp_path, *BLOCKS)
    lines = compose_final_log(log, scores, target_fid=90.0, target_clip=0.15, training_end=None,
                              target_toy={"toy": 0.5})
    assert _events(lines)[-1] == ("run_stop", 200, 41)


def _step_nums(lines: list[str]) -> list[tuple[str, int | None]]:
    records = [json.loads(line.split(MLLOG_TOKEN, 1)[1]) for line in lines if MLLOG_TOKEN in line]
    return [(r["key"], r["metadata"].get("step_num")) for r in records
            if r["key"] in ("eval_start", "eval_accuracy", "eval_stop", "run_stop")]


def test_evaluations_and_run_stop_name_the_checkpoints_step(tmp_path):
    log = _training_log(tmp_path, *BLOCKS)
    scores = [Score(7, 100, 21, 95.0, 0.2), Score(14, 200, 41, 80.0, 0.2)]
    lines = compose_final_log(log, scores, target_fid=90.0, target_clip=0.15, training_end=None)
    assert _step_nums(lines) == [("eval_start", 7), ("eval_accuracy", 7), ("eval_accuracy", 7), ("eval_stop", 7),
                                 ("eval_start", 14), ("eval_accuracy", 14), ("eval_accuracy", 14),
                                 ("eval_stop", 14), ("run_stop", 14)]
    aborted = compose_final_log(log, scores[:1], target_fid=90.0, target_clip=0.15, training_end=(250, 45))
    assert _step_nums(aborted)[-1] == ("run_stop", None)  # the end of training is no checkpoint's step
