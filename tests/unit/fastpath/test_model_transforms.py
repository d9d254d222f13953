"""The compile probe says why torch.compile cannot run, and the device settings leave the CPU alone."""

from __future__ import annotations

import torch

from sd_mlperf.fastpath.compile import compile_available
from sd_mlperf.fastpath.runtime import configure_device


def test_compile_available_reports_a_reason(monkeypatch):
    ok, why = compile_available(torch.device("cpu"))
    assert ok and why == ""  # g++ is part of this project's CPU environment
    monkeypatch.setattr("shutil.which", lambda name: None)
    ok, why = compile_available(torch.device("cpu"))
    assert not ok and "model.unet.compile=false" in why


def test_configure_device_changes_nothing_on_cpu():
    before = torch.backends.cudnn.benchmark
    configure_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark == before
