"""Autocast contexts for each precision."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sd_mlperf.models.precision import autocast

CPU = torch.device("cpu")


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_autocast_dtype(precision, dtype):
    lin = torch.nn.Linear(4, 4)
    with autocast(precision, CPU):
        out = lin(torch.randn(2, 4))
    assert out.dtype == dtype and lin.weight.dtype == torch.float32


def test_autocast_fp32_and_bad_value():
    assert isinstance(autocast("fp32", CPU), contextlib.nullcontext)
    with pytest.raises(ValueError, match="training.precision"):
        autocast("fp8", CPU)
