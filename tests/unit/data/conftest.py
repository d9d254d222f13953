"""Fixtures for the data tests: a tiny synthetic-data config and tiny frozen models (built once)."""

from __future__ import annotations

import pytest
import torch
from data_helpers import EMB_DIM, IMAGE_SIZE

from sd_mlperf.config.schema import SyntheticDataConfig, TextEncoderConfig, VAEConfig


@pytest.fixture
def synthetic_cfg() -> SyntheticDataConfig:
    return SyntheticDataConfig(num_train_samples=12, num_train_shards=2, num_val_prompts=3, image_size=IMAGE_SIZE,
                               seed=3)


@pytest.fixture(scope="session")
def tiny_vae() -> torch.nn.Module:
    from sd_mlperf.models.vae import build_vae

    torch.manual_seed(0)
    return build_vae(VAEConfig(base_channels=8, channel_mult=[1, 1, 2, 2], norm_groups=4)).eval()


@pytest.fixture(scope="session")
def tiny_text_encoder() -> torch.nn.Module:
    from sd_mlperf.models.text_encoder import build_text_encoder

    torch.manual_seed(0)
    return build_text_encoder(TextEncoderConfig(width=EMB_DIM, num_heads=2, num_layers=2)).eval()


@pytest.fixture
def sd_log(caplog):
    """caplog wired to the sd_mlperf logger (which may not propagate) with warn-once state cleared."""
    from sd_mlperf.utils.logging import logger, reset_log_once

    reset_log_once()
    attach = not logger.propagate  # the CLI's setup_logging stops propagation to the root (caplog's) handler
    if attach:
        logger.addHandler(caplog.handler)
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)
