"""The end-of-run summary, read back from a run directory."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.report.run_data import read_run
from sd_mlperf.report.summary import is_benchmark_model, log_run_summary, run_summary
from sd_mlperf.utils.logging import logger
from tests.unit.report.run_dir import make_run


def test_summary_of_a_smoke_run(tmp_path):
    data = read_run(make_run(tmp_path))
    text = run_summary(data)
    assert "run_start..run_stop 5.0 s at 80 samples, status aborted (mlperf.log)" in text
    assert "initialization before it 3.0 s" in text
    assert "80 trained in 20 steps of global batch 4 (1 rank(s) x micro batch 4 x 1 accumulation)" in text
    assert "2 (inline); last at 80 samples: FID 80 CLIP 0.16 toy_background_acc 0.3" in text
    assert "FID 80 at 80 samples, CLIP 0.16 at 80 samples" in text
    assert "FID <= 90 and CLIP >= 0.15: first reached at 80 samples (step 20)" in text
    # the median of the intervals after the first (81, 82, 83): the first holds the warm-up
    assert "82.0 img/s = 82.0 per rank x 1 rank(s) (median of 3 log intervals" in text
    assert "MFU n/a; peak memory n/a" in text
    assert "config.yaml, resolved_backends.yaml" not in text  # no resolved_backends.yaml in this directory
    assert "config.yaml, metrics.jsonl, mlperf.log, eval/ (2 grids)" in text
    # projection: GBS 4 is below the RCPs, and the tiny UNet's speed says nothing about the benchmark
    assert "benchmark run at global batch 4 on 1 GPU(s)" in text
    assert "outside the RCP range 256..2048" in text and "1,706,667" in text
    assert "measured in this run on the CPU" in text
    assert "not the benchmark's" in text
    assert "converged in" not in text  # status aborted


def test_a_converged_run_shows_its_measured_time(tmp_path):
    text = run_summary(read_run(make_run(tmp_path, status="success")))
    assert "measured: this run converged in 0.1 min at 80 samples" in text


def test_projection_with_given_numbers(tmp_path):
    data = read_run(make_run(tmp_path))
    text = run_summary(data, num_gpus=64, img_per_s_per_gpu=137.0, global_batch_size=512)
    assert "benchmark run at global batch 512 on 64 GPU(s)" in text
    assert "samples to converge 2,104,889: olympic mean of the 20 RCP runs at BS 512" in text
    assert "137.0 img/s per GPU (given) x 64 = 8768.0 img/s" in text
    assert f"=> {2_104_888.889 / 8768 / 60:.1f} min of training" in text
    assert "note:" not in text


def test_target_not_reached_and_toy_targets(tmp_path):
    run = make_run(tmp_path, fids=(120.0, 95.0), overrides=["training.target_toy={toy_background_acc: 0.5}"])
    text = run_summary(read_run(run))
    assert "FID <= 90 and CLIP >= 0.15 and toy_background_acc >= 0.5: not reached" in text


def test_offline_scores_join_the_evaluations(tmp_path):
    run = make_run(tmp_path)
    offline = run / "eval_offline"
    offline.mkdir()
    (offline / "scores.jsonl").write_text(json.dumps({"step": 30, "samples_count": 120, "collected_ms": 0,
                                                      "fid": 70.0, "clip": 0.2}) + "\n")
    (offline / "step_0000030.json").write_text(json.dumps({"step": 30, "samples_count": 120, "fid": 70.0,
                                                           "clip": 0.2, "extra": {"toy_object_acc": 0.5}}))
    data = read_run(run)
    assert [(e["source"], e["samples"]) for e in data.evals] == [("inline", 40), ("inline", 80), ("offline", 120)]
    assert data.metric_names() == ["fid", "clip", "toy_background_acc", "toy_object_acc"]
    assert "3 (inline, offline); last at 120 samples: FID 70" in run_summary(data)


def test_no_run_stop_yet_points_at_offline_evaluation(tmp_path):
    run = make_run(tmp_path)
    log = run / "mlperf.log"
    log.write_text("".join(x + "\n" for x in log.read_text().splitlines() if "run_stop" not in x))
    assert "no run_stop yet in mlperf.log" in run_summary(read_run(run))


def test_the_benchmark_unet_is_recognised(tmp_path):
    data = read_run(make_run(tmp_path))
    assert not is_benchmark_model(data)  # the smoke UNet at 64 px
    cfg = data.cfg
    data.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, unet=UNetConfig(channels_last=True)),
                                   data=dataclasses.replace(cfg.data, image_size=512))
    assert is_benchmark_model(data)  # execution choices (channels_last, backends) change no speed-relevant shape


def test_train_logs_the_summary(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logger, "propagate", True)  # setup_logging may have turned it off: caplog needs it
    run = make_run(tmp_path)
    with caplog.at_level("INFO", logger="sd_mlperf"):
        log_run_summary(run, read_run(run).cfg)
    assert "run summary:" in caplog.text and f"sd-mlperf report {run}" in caplog.text


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory of `sd-mlperf train`"):
        read_run(tmp_path)


def test_samples_trained_come_from_the_authoritative_record_not_the_progress_records(tmp_path):
    run = make_run(tmp_path)
    log = run / "mlperf.log"  # trained 96 (24 steps) though the last progress record says step 20
    log.write_text(log.read_text().replace('"samples_count": 80, "status"', '"samples_count": 96, "status"'))
    text = run_summary(read_run(run))
    assert "96 trained in 24 steps of global batch 4" in text and "from mlperf.log run_stop" in text
    # offline evaluation: the training_end record of the index decides (a Ctrl-C at step 6: 24 samples)
    index = run / "eval_checkpoints" / "index.jsonl"
    index.parent.mkdir()
    index.write_text(json.dumps({"event": "training_end", "samples_count": 24, "time_ms": 0,
                                 "reason": "interrupted"}) + "\n")
    text = run_summary(read_run(run))
    assert "24 trained in 6 steps" in text and "training_end (interrupted)" in text
