"""Per-system overlays: each resolves to the reference's global batch, learning rate and eval cadence."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from sd_mlperf.config import global_batch_size, learning_rate, load_config, steps_between_checkpoints
from sd_mlperf.config.closed_division import closed_division_rcp_mismatch
from sd_mlperf.config.rcp import load_rcp_hyperparameters

REPO = Path(__file__).resolve().parents[2]
SYSTEM_DIR = REPO / "conf" / "system"
BASE = REPO / "conf" / "sd2_mlperf.yaml"

# name -> (global batch, learning rate, steps between checkpoints). The four reference configs come from
# mlcommons/training stable_diffusion/configs/train_*.yaml; the 32-node ones also match the reference's
# val_check_interval (1000, 500, 250 steps). Where the global batch has an RCP, the learning rate is the RCP's
# base (mlperf-logging rcps_stable_diffusion.json: 256 -> 2.8e-7, 512 -> 2.3e-7, 1024 and 2048 -> 1.25e-7) x GBS;
# elsewhere the reference's 1.25e-7 x GBS.
EXPECTED = {
    "01x08x08": (64, 8.0e-6, 8000),
    "32x08x02": (512, 1.1776e-4, 1000),
    "32x08x04": (1024, 1.28e-4, 500),
    "32x08x08": (2048, 2.56e-4, 250),
    "02x08x08": (128, 1.6e-5, 4000),  # the seed's example system
    "01x08x32": (256, 7.168e-5, 2000),  # NVIDIA-style H100 node
    "01x08x64": (512, 512 * 2.3e-7, 1000),  # NVIDIA v5.0 H100/H200 node: the RCP's lr for GBS 512
}


def test_every_expected_system_config_exists_and_nothing_else():
    assert sorted(p.stem for p in SYSTEM_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_system_config_resolves_to_reference_numbers(name):
    cfg = load_config([BASE, SYSTEM_DIR / f"{name}.yaml"])
    gbs, lr, steps = EXPECTED[name]
    assert global_batch_size(cfg) == gbs
    assert math.isclose(learning_rate(cfg), lr, rel_tol=1e-12)
    assert steps_between_checkpoints(cfg) == steps == math.ceil(512000 / gbs)
    assert cfg.training.checkpoint_every_samples == 512000
    assert cfg.run.submission_platform != "unknown"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_name_is_nodes_x_gpus_x_batch(name):
    nodes, gpus, batch = (int(x) for x in re.fullmatch(r"(\d\d)x(\d\d)x(\d\d)", name).groups())
    raw = yaml.safe_load((SYSTEM_DIR / f"{name}.yaml").read_text())
    assert (raw["parallel"]["num_nodes"], raw["parallel"]["gpus_per_node"]) == (nodes, gpus)
    assert raw["training"]["micro_batch_size"] == batch


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_overlay_uses_the_rcp_hyperparameters_of_its_global_batch(name):
    cfg = load_config([BASE, SYSTEM_DIR / f"{name}.yaml"])
    gbs = global_batch_size(cfg)
    rcp = next((r for r in load_rcp_hyperparameters() if r.global_batch_size == gbs), None)
    if rcp is None:  # no RCP at this batch: the reference's base lr, and the closed division warns
        assert cfg.optim.base_lr_per_sample == 1.25e-7
        assert closed_division_rcp_mismatch(cfg) is not None
    else:
        assert (cfg.optim.base_lr_per_sample, cfg.optim.warmup_steps) == (rcp.base_lr_per_sample, rcp.warmup_steps)
        assert closed_division_rcp_mismatch(cfg) is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_comment_states_the_resolved_numbers(name):
    # The comments are what a reader checks first; keep them true.
    gbs, lr, steps = EXPECTED[name]
    text = (SYSTEM_DIR / f"{name}.yaml").read_text()
    assert f"= {gbs}." in text and f"= {steps} steps" in text
    base, batch, stated_lr = re.search(r"Learning rate = ([0-9.e-]+) x (\d+) = ([0-9.e-]+)\.", text).groups()
    assert int(batch) == gbs and math.isclose(float(base) * gbs, lr, rel_tol=1e-12)
    assert math.isclose(float(stated_lr), lr, rel_tol=1e-12)


def test_overrides_still_win_over_a_system_overlay():
    cfg = load_config([BASE, SYSTEM_DIR / "02x08x08.yaml"], ["training.micro_batch_size=4"])
    assert global_batch_size(cfg) == 64 and steps_between_checkpoints(cfg) == 8000
