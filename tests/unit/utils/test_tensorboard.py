"""The optional TensorBoard writer: same scalars as metrics.jsonl, the eval grids, a clear error without it."""

from __future__ import annotations

import io
import sys

import pytest
from PIL import Image

from sd_mlperf.commands import train
from sd_mlperf.config.schema import LoggingConfig
from sd_mlperf.training.metrics import Progress
from sd_mlperf.utils.tensorboard import TENSORBOARD_DIR, TensorBoardSink, build_tensorboard_sink, summary_writer_class


class StandInWriter:
    """The add_scalar / add_image / close interface of torch.utils.tensorboard.SummaryWriter, recorded."""

    def __init__(self):
        self.scalars, self.images, self.closed = [], [], False

    def add_scalar(self, tag, scalar_value, global_step=None):
        self.scalars.append((tag, scalar_value, global_step))

    def add_image(self, tag, img_tensor, global_step=None, *, dataformats="CHW"):
        self.images.append((tag, img_tensor.shape, global_step, dataformats))

    def close(self):
        self.closed = True


def _log_some(tmp_path, sink):
    grid_dir = tmp_path / "eval"
    grid_dir.mkdir()
    Image.new("RGB", (64, 32), "red").save(grid_dir / "step_0000005.png")
    progress = Progress(LoggingConfig(), tmp_path, enabled=True, total_steps=10, global_batch_size=8,
                        stream=io.StringIO(), sinks=[sink])
    progress.log_start()
    progress.log_train(5, 40, {"loss": 0.25, "skipped_steps": 0, "grad_norm": 1.0}, lr=1e-4, loss_scale=1024.0,
                       steps_to_checkpoint=5)
    progress.log_eval(5, 40, 123.0, 0.1, 2.0, extra={"toy_background_acc": 0.5})
    progress.close()


def test_the_sink_gets_the_metrics_scalars_and_the_grid(tmp_path):
    writer = StandInWriter()
    _log_some(tmp_path, TensorBoardSink(writer, tmp_path / "eval"))
    tags = {tag: (value, step) for tag, value, step in writer.scalars}
    assert tags["train/loss"] == (0.25, 40) and tags["train/lr"] == (1e-4, 40)
    assert "train/img_per_s" in tags and "train/img_per_s_per_gpu" in tags
    assert "train/mfu" not in tags and "train/peak_mem_gib" not in tags  # n/a on the CPU: nothing to draw
    assert tags["eval/fid"] == (123.0, 40) and tags["eval/clip"] == (0.1, 40)
    assert tags["eval/toy_background_acc"] == (0.5, 40)  # whatever the eval record carries
    assert not any(tag.endswith(("/step", "/samples", "/time")) for tag in tags)
    assert writer.images == [("eval/samples", (32, 64, 3), 40, "HWC")]
    assert writer.closed


def test_the_real_writer_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_some(tmp_path, build_tensorboard_sink(tmp_path, tmp_path / "eval"))
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert {"train/loss", "eval/fid", "eval/toy_background_acc"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [40]
    assert events.Tags()["images"] == ["eval/samples"]


def test_without_tensorboard_the_error_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"logging.tensorboard=true needs the tensorboard package") as exc:
        summary_writer_class()
    assert "pip install -c tests/constraints-cpu.txt -e '.[tensorboard]'" in str(exc.value)
    assert "logging.tensorboard=false" in str(exc.value)


def test_training_with_tensorboard_but_without_it_fails_before_any_work(monkeypatch, tmp_path, request):
    monkeypatch.chdir(request.config.rootpath)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RuntimeError, match="needs the tensorboard package"):
        train.main(["conf/smoke.yaml"], [f"run.output_dir={tmp_path}", "logging.tensorboard=true"])
    assert not (tmp_path / "smoke").exists()  # nothing written: no config, no data, no MLPerf log
