"""sd_mlperf.commands.train.main: the start-up settings and the smoke assets it applies before building the trainer."""

from __future__ import annotations

import pytest
import torch

import sd_mlperf.parallel.distributed
import sd_mlperf.training.build
import sd_mlperf.training.smoke_assets
from sd_mlperf.commands import train

SMOKE = "conf/smoke.yaml"


class _Stop(Exception):
    pass


def test_main_configures_the_device_and_prepares_smoke_assets_before_building(monkeypatch, tmp_path, request):
    monkeypatch.chdir(request.config.rootpath)
    calls: list[str] = []
    configured: list[torch.device] = []

    def configure_device(device):
        calls.append("configure_device")
        configured.append(device)

    def prepare_smoke_assets(cfg, dist):
        assert cfg.data.synthetic_dir is not None  # the smoke config: its assets are made before the build
        calls.append("prepare_smoke_assets")

    def build_trainer(cfg, dist, **kwargs):
        assert configured == [dist.device]  # cuDNN autotuning is set before any model exists
        calls.append("build_trainer")
        raise _Stop

    monkeypatch.setattr(sd_mlperf.parallel.distributed, "configure_device", configure_device)
    monkeypatch.setattr(sd_mlperf.training.smoke_assets, "prepare_smoke_assets", prepare_smoke_assets)
    monkeypatch.setattr(sd_mlperf.training.build, "build_trainer", build_trainer)
    with pytest.raises(_Stop):
        train.main([SMOKE], [f"run.output_dir={tmp_path}", "run.num_threads=2"])
    assert calls == ["configure_device", "prepare_smoke_assets", "build_trainer"]
    assert configured == [torch.device("cpu")]
    assert torch.get_num_threads() == 2  # run.num_threads applied too (the conftest fixture restores it)
