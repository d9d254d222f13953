"""model.unet.compile: the compilation happens in build_trainer's warm_up (before run_start), on synthetic
tensors, changing no training state; the timed steps then reuse the compiled graphs. Dynamo runs for real; the
graphs execute with the `eager` backend (inductor's C++ build would take minutes on a CPU), so the math is the
uncompiled step's and the losses must agree bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from sd_mlperf.training.step import EagerTrainStep
from tests.unit.training._helpers import CONTEXT, make_batches, make_cfg, make_trainer, record_losses


@pytest.fixture
def dynamo_eager_backend(monkeypatch):
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_compiles_before_run_start_and_changes_nothing(tmp_path, caplog, dynamo_eager_backend):
    # The data's context length, so the synthetic warmup tensors have the training shapes.
    common = ["training.max_steps=2", "logging.interval_steps=2", f"model.text_encoder.context_length={CONTEXT[0]}"]
    ref, _ = make_trainer(make_cfg(tmp_path / "ref", *common), make_batches(2))
    ref_losses = record_losses(ref)
    ref.fit()
    ref.close()
    counters.clear()
    with caplog.at_level(logging.INFO, logger="sd_mlperf"):
        trainer, loader = make_trainer(make_cfg(tmp_path / "compiled", *common, "model.unet.compile=true"),
                                       make_batches(2))
    assert isinstance(trainer.optimizer_step, EagerTrainStep) and trainer.optimizer_step.compile_inputs is not None
    compiled_at_build = counters["stats"]["unique_graphs"]
    assert compiled_at_build >= 1  # dynamo traced the UNet inside build_trainer
    assert loader.pos == 0  # on synthetic tensors, not the data
    assert any("compile warmup" in r.getMessage() and "before run_start" in r.getMessage() for r in caplog.records)
    assert all(p.grad is None for p in trainer.dp.params) and not trainer.dp.optimizer.state  # no optimizer step
    losses = record_losses(trainer)
    trainer.fit()
    trainer.close()
    assert counters["stats"]["unique_graphs"] == compiled_at_build  # nothing compiled during the timed steps
    assert losses == ref_losses  # same RNG position after warmup, same math

