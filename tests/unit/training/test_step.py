"""step_metrics: which non-finite steps are fatal (an applied update) and which are an fp16 skip."""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.training.step import step_metrics

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(("loss", "grad_norm", "ok", "loss_scaling", "fatal"), [
    (0.5, 1.0, True, True, False),     # a clean step
    (0.5, INF, False, True, False),    # fp16 overflow: skipped and the scale backs off, not fatal
    (NAN, 1.0, False, True, False),
    (NAN, 1.0, True, True, True),      # applied with a NaN loss: the run is broken
    (0.5, INF, True, True, True),
    (0.5, NAN, False, False, True),    # bf16/fp32: no scaler, so any non-finite value is fatal
    (INF, 1.0, False, False, True),
    (0.5, 1.0, False, False, False),
])
def test_fatal_marks_non_finite_steps_that_are_not_an_fp16_skip(loss, grad_norm, ok, loss_scaling, fatal):
    out = step_metrics(torch.tensor(loss), torch.tensor(ok), torch.tensor(grad_norm), loss_scaling)
    assert set(out) == {"loss", "ok", "grad_norm", "fatal"}
    assert bool(out["fatal"]) is fatal and out["fatal"].dtype == torch.bool
    assert bool(out["ok"]) is ok and (torch.equal(out["loss"], torch.tensor(loss)) or loss != loss)
