"""Progress lines, the metrics JSONL and the device-side interval meter."""

from __future__ import annotations

import io
import json
import math

import torch

from sd_mlperf.config.schema import LoggingConfig
from sd_mlperf.training.meter import IntervalMeter
from sd_mlperf.training.metrics import Progress, read_metrics


def test_meter_averages_applied_steps_only():
    meter = IntervalMeter()
    yes, no = torch.tensor(True), torch.tensor(False)
    meter.add(torch.tensor(1.0), yes, torch.tensor(0.5), no)
    meter.add(torch.tensor(float("inf")), no, torch.tensor(float("inf")), no)  # an fp16 skip
    meter.add(torch.tensor(3.0), yes, torch.tensor(0.25), no)
    assert not meter.any_fatal()
    out = meter.pop()
    assert out == {"loss": 2.0, "skipped_steps": 1, "grad_norm": 0.25}
    assert meter.pop() == {}


def test_meter_reduces_over_ranks_before_reading():
    calls = []

    def fake_mean(t):  # as if another rank saw a loss of 5 and a fatal step
        calls.append(t.clone())
        other = torch.tensor([5.0, 1.0, 1.0])[: t.numel()] if t.numel() == 3 else torch.tensor([1.0])
        return (t + other) / 2

    meter = IntervalMeter(fake_mean)
    meter.add(torch.tensor(1.0), torch.tensor(True), torch.tensor(0.1), torch.tensor(False))
    assert meter.any_fatal()
    assert meter.pop()["loss"] == 3.0
    assert len(calls) == 2


def test_progress_writes_line_and_jsonl(tmp_path, caplog):
    stream = io.StringIO()  # not a terminal: no bar
    progress = Progress(LoggingConfig(), tmp_path, enabled=True, total_steps=10, global_batch_size=8, stream=stream)
    assert progress._bar is None
    rec = progress.log_train(5, 40, {"loss": 0.25, "skipped_steps": 0, "grad_norm": 1.0}, lr=1e-4, loss_scale=1024.0,
                             steps_to_checkpoint=5)
    progress.log_eval(5, 40, 123.0, 0.1, 2.0)
    progress.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["train", "eval"]
    assert lines[0]["loss"] == 0.25 and lines[0]["samples"] == 40 and lines[0]["loss_scale"] == 1024.0
    assert rec["img_per_s"] > 0 and math.isclose(rec["s_to_checkpoint"], 5 * rec["step_time_s"])
    assert lines[1]["fid"] == 123.0


def test_progress_bar_when_forced(tmp_path):
    stream = io.StringIO()
    progress = Progress(LoggingConfig(progress_bar="on"), tmp_path, enabled=True, total_steps=4,
                        global_batch_size=2, stream=stream)
    for step in range(1, 4):
        progress.tick(step)
    progress.log_train(3, 6, {"loss": 1.0}, lr=1.0, loss_scale=1.0, steps_to_checkpoint=1)
    progress.close()
    text = stream.getvalue()
    assert "3/4" in text and "step 3/4" in text


def test_disabled_progress_writes_nothing(tmp_path):
    progress = Progress(LoggingConfig(), tmp_path, enabled=False, total_steps=4, global_batch_size=2)
    progress.log_train(1, 2, {"loss": 1.0}, lr=1.0, loss_scale=1.0, steps_to_checkpoint=1)
    progress.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_progress_bar_rule_is_on_off_or_terminal_only():
    import io

    from sd_mlperf.utils.logging import show_progress_bar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert show_progress_bar("on", io.StringIO()) and not show_progress_bar("off", Tty())
    assert show_progress_bar("auto", Tty()) and not show_progress_bar("auto", io.StringIO())


def test_read_metrics_keeps_each_step_once_after_a_resume(tmp_path):
    cfg = LoggingConfig(progress_bar="off")
    first = Progress(cfg, tmp_path, enabled=True, total_steps=6, global_batch_size=2)
    for step in (2, 4, 6):  # checkpointed at 4, killed after logging 6
        first.log_train(step, 2 * step, {"loss": float(step)}, lr=1e-4, loss_scale=1.0, steps_to_checkpoint=1)
    first.close()
    second = Progress(cfg, tmp_path, enabled=True, total_steps=8, global_batch_size=2, start_step=4)
    second.log_resume(4, 8, "checkpoints/step_4")
    for step in (6, 8):
        second.log_train(step, 2 * step, {"loss": step + 0.5}, lr=1e-4, loss_scale=1.0, steps_to_checkpoint=1)
    second.close()

    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [2, 4, 6, 4, 6, 8]  # the file keeps everything
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("resume", 4), ("train", 6),
                                                         ("train", 8)]
    assert [r["loss"] for r in records if r["kind"] == "train"] == [2.0, 4.0, 6.5, 8.5]


def _log(progress: Progress, *steps: int, loss: float = 0.0) -> None:
    for step in steps:
        progress.log_train(step, 2 * step, {"loss": step + loss}, lr=1e-4, loss_scale=1.0, steps_to_checkpoint=1)


def test_read_metrics_fresh_relaunches_repeated_resumes_and_evals(tmp_path):
    cfg = LoggingConfig(progress_bar="off")
    attempts = [(None, (1, 2)),      # killed before its first checkpoint
                (None, (1, 2, 3)),   # relaunched fresh (nothing to resume); checkpoint at 2, killed after 3
                (2, (3, 4, 5)),      # resumed from 2, checkpoint at 4, killed after 5
                (4, (5, 6))]         # resumed from 4, finishes
    for number, (resume_step, steps) in enumerate(attempts):
        progress = Progress(cfg, tmp_path, enabled=True, total_steps=6, global_batch_size=2)
        if resume_step is None:
            progress.log_start()
        else:
            progress.log_resume(resume_step, 2 * resume_step, f"step_{resume_step}")
        _log(progress, *steps, loss=number / 10)
        if number == 2:
            progress.log_eval(4, 8, fid=80.0, clip=0.2, seconds=1.0)
        progress.close()
    train = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert train == [(1, 1.1), (2, 2.1), (3, 3.2), (4, 4.2), (5, 5.3), (6, 6.3)]
    evals = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [4]  # logged by the attempt that resumed from 2, at a step the later resume (from 4) keeps


def test_a_torn_last_line_is_cut_by_the_next_run_so_no_record_is_glued_to_it(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "start", "step": 0}\n{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tra')
    progress = Progress(LoggingConfig(progress_bar="off"), tmp_path, enabled=True, total_steps=2, global_batch_size=2)
    progress.log_resume(1, 2, "step_1")
    _log(progress, 2)
    progress.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and '"kind": "tra' not in lines[2] and json.loads(lines[2])["kind"] == "resume"
    records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [("start", 0), ("train", 1), ("resume", 1), ("train", 2)]


def test_the_reader_skips_a_damaged_line_naming_it(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "start", "step": 0}\n{"kind": "tra\n{"kind": "train", "step": 1}\n')
    with caplog.at_level("WARNING"):
        records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [("start", 0), ("train", 1)]
    assert f"{path}:2: skipped" in caplog.text


def test_progress_line_shows_per_rank_speed_and_na_on_the_cpu(tmp_path, caplog, monkeypatch):
    from sd_mlperf.training.metrics import Hardware
    from sd_mlperf.utils.logging import logger

    monkeypatch.setattr(logger, "propagate", True)  # setup_logging may have turned it off: caplog needs it
    progress = Progress(LoggingConfig(), tmp_path, enabled=True, total_steps=10, global_batch_size=8,
                        stream=io.StringIO(), hardware=Hardware(world_size=2, flop_per_image=1e9))
    with caplog.at_level("INFO", logger="sd_mlperf"):
        rec = progress.log_train(5, 40, {"loss": 0.25}, lr=1e-4, loss_scale=1.0, steps_to_checkpoint=5)
    progress.close()
    assert rec["img_per_s_per_gpu"] == rec["img_per_s"] / 2
    assert rec["mfu"] is None and rec["peak_mem_gib"] is None  # no peak FLOP/s, no CUDA memory on the CPU
    assert f"({rec['img_per_s_per_gpu']:.1f}/rank, MFU n/a, peak mem n/a)" in caplog.text
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] is None


def test_mfu_of_the_reference_speed_is_a_third_of_the_h100_peak():
    from sd_mlperf.training.metrics import Hardware

    # REFERENCE.md: about 137 img/s per H100 at 2.41 TFLOP per image is about 33% of the 989 TFLOP/s dense peak.
    hw = Hardware(world_size=8, unit="GPU", flop_per_image=2.41e12, peak_flop_per_s=989e12)
    stats = hw.stats(8 * 137.0)
    assert stats["img_per_s_per_gpu"] == 137.0
    assert abs(stats["mfu"] - 0.334) < 0.001
    assert hw.stats(float("nan"))["mfu"] is None


def test_build_derives_the_hardware_once_from_the_config(request, monkeypatch):
    from sd_mlperf.config import load_config
    from sd_mlperf.models import flops
    from sd_mlperf.training.build import progress_hardware
    from sd_mlperf.utils.dist_info import DistInfo

    calls = []
    monkeypatch.setattr(flops, "unet_train_flops", lambda unet, **kw: calls.append((unet, kw)) or 123)
    cfg = load_config([request.config.rootpath / "conf" / "smoke.yaml"])
    hw = progress_hardware(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                         backend="none"))
    assert hw.unit == "rank" and hw.peak_flop_per_s is None and hw.memory_device is None
    assert hw.flop_per_image == 123
    assert calls == [(cfg.model.unet, {"latent_size": 8, "context_length": cfg.model.text_encoder.context_length})]
    other = progress_hardware(cfg, DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"),
                                            backend="gloo"))
    assert other.flop_per_image is None and other.world_size == 2  # only rank 0 logs: only it counts
    assert len(calls) == 1
