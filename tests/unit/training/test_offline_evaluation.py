"""Offline evaluation of a run directory: which checkpoints are scored, and the final log the checkers read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sd_mlperf.training.eval_checkpoints import STOP_FILE, read_index
from sd_mlperf.training.final_log import parse_mllog_line
from sd_mlperf.training.offline_eval import RunEvaluation, read_score_records
from tests.unit.training._helpers import make_batches, make_cfg, make_trainer

PASS, FAIL = (80.0, 0.2), (120.0, 0.1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tiny run with eval.inline=false: 6 collected checkpoints (every 2 steps, 4 samples)."""
    tmp = tmp_path_factory.mktemp("offline")
    cfg = make_cfg(tmp, "eval.inline=false", "checkpoint.resumable=false", "training.max_steps=12",
                   "training.checkpoint_every_samples=4")
    trainer, _ = make_trainer(cfg, make_batches(3))
    trainer.fit()
    trainer.close()
    return tmp / "run"


def _runner(run_dir, verdicts, calls, **kw):
    """RunEvaluation with a stand-in for FID/CLIP: verdicts[i] is the score of the i-th collected checkpoint."""
    steps = [r["step"] for r in read_index(run_dir)[0]]

    def evaluate(payload):
        calls.append(payload["step"])
        return verdicts[steps.index(payload["step"])]

    args = {"num_prompts": 30000, "noise_seed": 5, "target_fid": 90.0, "target_clip": 0.15, "is_main": True,
            "final_num_prompts": 30000, **kw}
    return RunEvaluation(run_dir, evaluate=evaluate, **args)


def _copy(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def _events(path):
    return [r for r in (parse_mllog_line(line) for line in path.read_text().splitlines()) if r]


def _check(log, cwd):
    cmd = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training", "--ruleset", "5.0.0",
           str(log)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_all_scores_in_order_up_to_the_first_pass_and_times_run_stop_at_its_collection(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    calls: list[int] = []
    runner = _runner(run, [FAIL, FAIL, FAIL, PASS, FAIL, PASS], calls)
    records, _ = runner.collected()
    runner.score_all(records)
    assert calls == [2, 4, 6, 8]
    log = runner.write_final_log(run / "mlperf.log")
    events = _events(log)
    keys = [e["key"] for e in events]
    assert keys.count("eval_accuracy") == 8 and keys[-1] == "run_stop"
    stop = events[-1]
    assert stop["metadata"] == {**stop["metadata"], "status": "success", "samples_count": 16}
    assert stop["time_ms"] == records[3]["collected_ms"]
    assert stop["metadata"]["step_num"] == 8
    # As the v5.0 results: every training line (the blocks after the passing checkpoint too), then the
    # evaluations in the order they ran, stamped with their real times, then run_stop (back-dated).
    training = (run / "mlperf_train.log").read_text().splitlines()
    assert log.read_text().splitlines()[: len(training)] == training
    assert max(e["metadata"]["samples_count"] for e in events if e["key"] == "block_stop") == 24
    evals = events[len(training):-1]
    assert [e["key"] for e in evals] == ["eval_start", "eval_accuracy", "eval_accuracy", "eval_stop"] * 4
    scores = {r["samples_count"]: r for r in read_score_records(run)}
    assert [e["metadata"]["samples_count"] for e in evals[::4]] == [r["samples_count"] for r in records[:4]]
    for start, fid, clip, end in zip(*[iter(evals)] * 4):
        score = scores[start["metadata"]["samples_count"]]
        assert start["time_ms"] == score["eval_start_ms"] and end["time_ms"] == score["eval_stop_ms"]
        assert score["collected_ms"] <= score["eval_start_ms"] <= fid["time_ms"] <= end["time_ms"]
        assert {e["metadata"]["step_num"] for e in (start, fid, clip, end)} == {score["step"]}
    result = _check(log, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # A second call scores nothing again: the scores are kept in RUN/eval_offline/scores.jsonl.
    again = _runner(run, [FAIL] * 6, calls)
    again.score_all(records)
    assert calls == [2, 4, 6, 8] and again.first_passing().step == 8


def test_last_two_bisects_and_logs_the_pair(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    calls: list[int] = []
    runner = _runner(run, [FAIL, FAIL, FAIL, FAIL, PASS, PASS], calls)
    runner.score_last_two(runner.collected()[0])
    assert calls[0] == 12 and set(calls) >= {8, 10} and len(calls) <= 4  # about log2(6) + 1, not 6
    events = _events(runner.write_final_log(run / "mlperf.log"))
    scored = sorted({e["metadata"]["samples_count"] for e in events if e["key"] == "eval_accuracy"})
    assert scored[-2:] == [16, 20] and events[-1]["metadata"]["samples_count"] == 20
    assert _check(run / "mlperf.log", tmp_path).returncode == 0


def test_last_two_reports_not_converged_when_the_last_checkpoint_fails(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    calls: list[int] = []
    runner = _runner(run, [FAIL] * 6, calls)
    runner.score_last_two(runner.collected()[0])
    assert calls == [12] and runner.first_passing() is None
    events = _events(runner.write_final_log(run / "mlperf.log"))
    end = read_index(run)[1]
    assert events[-1]["metadata"]["status"] == "aborted" and events[-1]["time_ms"] == end["time_ms"]
    assert events[-1]["metadata"]["samples_count"] == end["samples_count"]


def test_watch_stops_the_trainer_at_the_first_pass(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    calls: list[int] = []
    runner = _runner(run, [FAIL, PASS, PASS, PASS, PASS, PASS], calls)
    runner.watch(poll_s=0.01, timeout_s=5)
    assert calls == [2, 4] and "step 4" in (run / STOP_FILE).read_text()
    assert _events(runner.write_final_log(run / "mlperf.log"))[-1]["metadata"]["status"] == "success"


def test_quick_looks_never_write_the_final_log(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    runner = _runner(run, [PASS] * 6, [], num_prompts=500)
    runner.score_all(runner.collected()[0])
    with pytest.raises(ValueError, match="quick look"):
        runner.write_final_log(run / "mlperf.log")
    full = _runner(run, [FAIL] * 6, [])
    assert full.scores == {}  # a 500-prompt score is not a full one


def test_no_final_log_while_training_runs_without_a_pass(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    index = run / "eval_checkpoints" / "index.jsonl"
    index.write_text("".join(line + "\n" for line in index.read_text().splitlines()
                             if "training_end" not in line))
    runner = _runner(run, [FAIL] * 6, [])
    runner.score_all(runner.collected()[0])
    with pytest.raises(ValueError, match="training has not ended"):
        runner.write_final_log(run / "mlperf.log")
    assert json.loads(index.read_text().splitlines()[-1])["step"] == 12


def test_watch_beside_a_training_run_stops_it_at_the_first_pass(tmp_path):
    """The watcher in a thread beside the trainer, as it runs on other GPUs beside a benchmark run."""
    import threading
    import time

    cfg = make_cfg(tmp_path, "eval.inline=false", "checkpoint.resumable=false", "training.max_steps=12",
                   "training.checkpoint_every_samples=4")
    trainer, _ = make_trainer(cfg, make_batches(3))
    run = tmp_path / "run"
    runner = RunEvaluation(run, evaluate=lambda payload: PASS if payload["step"] >= 4 else FAIL, num_prompts=30000,
                           noise_seed=5, target_fid=90.0, target_clip=0.15, is_main=True, final_num_prompts=30000)
    watcher = threading.Thread(target=runner.watch, kwargs={"poll_s": 0.01, "timeout_s": 60})
    watcher.start()
    collect = trainer.collector.collect

    def collect_then_wait_for_the_watcher(step, *args, **kwargs):  # a trainer slower than its evaluator
        collect(step, *args, **kwargs)
        trainer.collector.wait()  # published
        deadline = time.monotonic() + 30
        while not (step in runner.scores and (not runner.passes(runner.scores[step]) or (run / STOP_FILE).exists())):
            assert time.monotonic() < deadline, f"the watcher never scored step {step}"
            time.sleep(0.01)

    trainer.collector.collect = collect_then_wait_for_the_watcher
    trainer.fit()
    trainer.close()
    watcher.join(60)
    assert not watcher.is_alive()
    assert trainer.state.step == 4 and read_index(run)[1]["reason"] == "stop_requested"
    events = _events(runner.write_final_log(run / "mlperf.log"))
    assert events[-1]["metadata"] == {**events[-1]["metadata"], "status": "success", "samples_count": 8}


# -- what `sd-mlperf evaluate` asks of the library -------------------------------------------------------
def test_run_dispatches_the_strategy_and_needs_a_collected_checkpoint(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    verdicts = [FAIL, FAIL, FAIL, FAIL, PASS, PASS]
    calls: dict[str, list[int]] = {}
    for strategy in ("all", "last_two", "watch"):
        (run / "eval_offline" / "scores.jsonl").unlink(missing_ok=True)  # score again
        _runner(run, verdicts, calls.setdefault(strategy, [])).run(strategy, poll_s=0.01, timeout_s=5)
    assert calls["all"] == calls["watch"] == [2, 4, 6, 8, 10]
    assert calls["last_two"][0] == 12 and set(calls["last_two"]) >= {8, 10}  # bisection from the last one
    assert (run / STOP_FILE).is_file()  # watch
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no collected checkpoint yet"):
        RunEvaluation(empty, evaluate=lambda p: PASS, num_prompts=2, noise_seed=0, target_fid=90.0,
                      target_clip=0.15, is_main=True, final_num_prompts=2).run("all")


@pytest.mark.parametrize(("verdicts", "exit_code", "verdict_line"), [
    ([FAIL, FAIL, FAIL, PASS, PASS, PASS], 0, "converged at 16 samples (step 8)"),
    ([FAIL] * 6, 1, "not converged"),
    ([PASS] * 6, 1, "the compliance checker (which wants two) refuses it"),
])
def test_conclude_writes_the_final_log_and_says_how_the_run_ended(run_dir, tmp_path, verdicts, exit_code,
                                                                   verdict_line):
    run = _copy(run_dir, tmp_path)
    runner = _runner(run, verdicts, [])
    runner.run("all")
    outcome = runner.conclude(run / "mlperf.log")
    assert outcome.exit_code == exit_code and outcome.error is None and (run / "mlperf.log").is_file()
    assert outcome.lonely == (verdicts[0] == PASS)
    summary = outcome.summary().splitlines()
    assert summary[0] == "step 2 samples 4: FID {:.4f} CLIP {:.4f} {}".format(
        *verdicts[0], "PASS" if verdicts[0] == PASS else "fail")
    assert len(summary) == len(outcome.scores) + 1 + outcome.lonely and verdict_line in outcome.summary()


def test_conclude_reports_a_log_it_cannot_write_yet(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    runner = _runner(run, [PASS] * 6, [], num_prompts=500)
    runner.run("all")
    outcome = runner.conclude(run / "mlperf.log")
    assert outcome.exit_code == 1 and "quick look" in outcome.error and not (run / "mlperf.log").exists()
    assert outcome.summary().splitlines()[-2].startswith("no final log written: ")


def test_load_run_config_takes_the_runs_config_on_this_launch_and_refuses_an_inline_run(run_dir, tmp_path):
    from sd_mlperf.training.eval_config import load_run_config, run_config_seed

    cfg = load_run_config(run_dir, overrides=["training.target_fid=-1"], num_prompts=3)
    assert cfg.run.seed == run_config_seed(run_dir) == 1234 and cfg.training.target_fid == -1
    assert (cfg.parallel.num_nodes, cfg.parallel.gpus_per_node) == (1, 1)
    with pytest.raises(ValueError, match="--num-prompts must be at least 2"):
        load_run_config(run_dir, num_prompts=1)
    with pytest.raises(ValueError, match="eval.inline=true"):
        load_run_config(run_dir, overrides=["eval.inline=true"])
    with pytest.raises(FileNotFoundError, match="--run-dir takes a run directory"):
        load_run_config(tmp_path)
    assert run_config_seed(tmp_path) is None and run_config_seed(None) is None


def test_load_checkpoint_config_adopts_the_seed_of_the_checkpoints_run(tmp_path):
    from sd_mlperf.config.schema import CheckpointConfig
    from sd_mlperf.training.checkpoints import Checkpointer, read_checkpoint_weights
    from sd_mlperf.training.eval_config import load_checkpoint_config
    from tests.unit.training._helpers import SMOKE

    Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path / "r1").save(
        10, 40, unet_state={"w": torch.zeros(2)}, optimizer_state=None, rank_state={})
    (tmp_path / "r1" / "config.yaml").write_text("run:\n  seed: 77\n")
    step = tmp_path / "r1" / "checkpoints" / "step_0000010"
    base = [f"run.output_dir={tmp_path}", "run.seed=null"]
    cfg, files = load_checkpoint_config([step, step / "model.pt"], [SMOKE], base, num_prompts=3)
    assert cfg.run.seed == 77 and cfg.eval.num_prompts == 3
    assert files == [step / "model.pt"] * 2  # checked, not read: the scoring loop reads one at a time
    checkpoints = [read_checkpoint_weights(f) for f in files]
    assert [(c.step, c.samples_count, c.run_dir) for c in checkpoints] == [(10, 40, tmp_path / "r1")] * 2
    assert load_checkpoint_config([step], [SMOKE], [*base, "run.seed=5"])[0].run.seed == 5  # set: kept
    cfg = load_checkpoint_config([step], [SMOKE], [*base, "eval.seed=3"])[0]
    assert (cfg.run.seed, cfg.eval.seed) == (None, 3)  # the evaluation noise is set: no seed adopted
    with pytest.raises(ValueError, match="--num-prompts"):
        load_checkpoint_config([step], [SMOKE], base, num_prompts=1)


# -- reliability (issue 22) ---------------------------------------------------------------------------
def test_scores_are_cached_by_settings_and_by_the_checkpoint_they_scored(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    calls: list[int] = []
    records = read_index(run)[0]
    _runner(run, [FAIL] * 6, calls, settings="ddim2").score_all(records[:2])
    _runner(run, [FAIL] * 6, calls, settings="ddim2").score_all(records[:2])
    assert calls == [2, 4]  # cached
    _runner(run, [FAIL] * 6, calls, settings="ddim10").score_all(records[:2])
    assert calls == [2, 4, 2, 4]  # another setting (e.g. eval.ddim_steps) scores again
    # Step 2 collected again (a resume) with other weights: its old scores are not its scores.
    index = run / "eval_checkpoints" / "index.jsonl"
    with open(index, "a") as f:
        f.write(json.dumps({**records[0], "sha256": "0" * 64}) + "\n")
    runner = _runner(run, [FAIL] * 6, calls, settings="ddim2")
    assert set(runner.scores) == {4}


def test_evaluation_settings_change_with_every_setting_that_decides_a_score(tmp_path):
    from sd_mlperf.training.score_key import evaluation_settings, settings_digest
    from tests.unit.training._helpers import make_cfg

    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("id\tcaption\n1\ta\n")
    base = make_cfg(tmp_path, f"eval.prompts_file={prompts}")
    digest = settings_digest(evaluation_settings(base))
    assert digest == settings_digest(evaluation_settings(make_cfg(tmp_path, f"eval.prompts_file={prompts}")))
    for override in ("eval.ddim_steps=20", "eval.guidance_scale=2.0", "eval.precision=bf16", "eval.num_prompts=3",
                     "eval.fid_method=sqrtm", "eval.clip_tiny=false"):
        assert settings_digest(evaluation_settings(make_cfg(tmp_path, f"eval.prompts_file={prompts}", override))) \
            != digest, override
    assert settings_digest(evaluation_settings(base, num_prompts=2)) != digest
    prompts.write_text("id\tcaption\n1\tb\n")  # the same path, other prompts
    assert settings_digest(evaluation_settings(base)) != digest
    same = make_cfg(tmp_path, f"eval.prompts_file={prompts}", "eval.num_grid_images=1", "eval.inline=false")
    assert settings_digest(evaluation_settings(same)) == settings_digest(evaluation_settings(base))


def test_a_resumed_offline_run_gets_its_stitched_final_log(tmp_path):
    import dataclasses

    from sd_mlperf.training.mlperf_log import RESUMED_KEY, TRAINING_LOG_FILE
    from sd_mlperf.training.offline_eval import open_run_evaluation
    from tests.unit.training._helpers import make_cfg, make_trainer

    cfg = make_cfg(tmp_path, "eval.inline=false", "training.max_steps=6", "training.checkpoint_every_samples=4")
    first, loader = make_trainer(cfg, make_batches(3))
    loader.fail_at = 5  # a kill during the third block
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    first.close()
    run = tmp_path / "run"
    by_path = dataclasses.replace(cfg, training=dataclasses.replace(
        cfg.training, resume=str(run / "checkpoints" / "step_0000002")))  # resumed by path from step 2, not 4
    second, _ = make_trainer(by_path, make_batches(3))
    second.fit()
    second.close()
    assert len(list(run.glob(f"{TRAINING_LOG_FILE}.*"))) == 1
    runner = _runner(run, [FAIL, FAIL, PASS], [])
    runner.score_all(runner.collected()[0])
    events = _events(runner.write_final_log(run / "mlperf.log"))
    keys = [e["key"] for e in events]
    assert keys.count("run_start") == 1 and keys.count("init_start") == 1 and keys.count(RESUMED_KEY) == 1
    assert keys.count("submission_benchmark") == 1 and keys[-1] == "run_stop"
    assert keys.index(RESUMED_KEY) < keys.index("run_start")  # kept however early the final log ends
    blocks = [(e["key"], e["metadata"]["samples_count"]) for e in events if e["key"] in ("block_start", "block_stop")]
    assert blocks == [("block_start", 0), ("block_stop", 4), ("block_start", 4), ("block_stop", 8),
                      ("block_start", 8), ("block_stop", 12)]
    assert events[-1]["metadata"]["status"] == "success"
    assert open_run_evaluation  # the command's entry point (used by test_evaluate_command)


def test_watch_ends_with_one_line_when_the_trainer_died_or_time_runs_out(run_dir, tmp_path):
    import socket
    import subprocess
    import sys

    from sd_mlperf.utils.errors import UserError

    run = _copy(run_dir, tmp_path)
    index = run / "eval_checkpoints" / "index.jsonl"
    index.write_text("".join(line + "\n" for line in index.read_text().splitlines() if "training_end" not in line))
    runner = _runner(run, [FAIL] * 6, [])
    with pytest.raises(UserError, match=r"--watch: no passing checkpoint .* within 0 s \(--watch-timeout-s\)"):
        runner.watch(poll_s=0.01, timeout_s=0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "eval_checkpoints" / "heartbeat.json").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    with pytest.raises(UserError, match=rf"--watch: the trainer \(pid {dead.pid} on this host\) is gone without "
                                        "recording the end of training"):
        runner.watch(poll_s=0.01, timeout_s=60)


def test_offline_evaluation_honours_the_toy_target_and_keeps_the_toy_metrics(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    toy = [(*PASS, {"toy_background_acc": acc}) for acc in (0.2, 0.5, 0.95, 0.3, 0.99, 0.99)]
    calls: list[int] = []
    runner = _runner(run, toy, calls, target_toy={"toy_background_acc": 0.9})
    runner.score_all(runner.collected()[0])
    assert calls == [2, 4, 6]  # FID and CLIP pass from the first; the toy metric only at the third
    assert runner.first_passing().step == 6
    events = _events(runner.write_final_log(run / "mlperf.log"))
    assert events[-1]["metadata"]["samples_count"] == 12 and events[-1]["metadata"]["status"] == "success"
    assert [r["extra"] for r in read_score_records(run)] == [t[2] for t in toy[:3]]
    # Read back from scores.jsonl, the toy metrics still decide.
    assert _runner(run, [PASS] * 6, calls, target_toy={"toy_background_acc": 0.9}).first_passing().step == 6
