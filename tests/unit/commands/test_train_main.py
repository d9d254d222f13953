"""sd_mlperf.commands.train.main: the start-up settings it applies before building the trainer."""

from __future__ import annotations

import pytest
import torch

import sd_mlperf.parallel.distributed
import sd_mlperf.training.build
from sd_mlperf.commands import train

SMOKE = "conf/smoke.yaml"


class _Stop(Exception):
    pass


def test_main_configures_the_device_before_building(monkeypatch, tmp_path, request):
    monkeypatch.chdir(request.config.rootpath)
    configured: list[torch.device] = []
    monkeypatch.setattr(sd_mlperf.parallel.distributed, "configure_device", configured.append)

    def build_trainer(cfg, dist, **kwargs):
        assert configured == [dist.device]  # cuDNN autotuning is set before any model exists
        raise _Stop

    monkeypatch.setattr(sd_mlperf.training.build, "build_trainer", build_trainer)
    with pytest.raises(_Stop):
        train.main([SMOKE], [f"run.output_dir={tmp_path}", "run.num_threads=2"])
    assert configured == [torch.device("cpu")]
    assert torch.get_num_threads() == 2  # run.num_threads applied too (the conftest fixture restores it)
