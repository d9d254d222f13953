"""BatchConditioner: latents from moments or online VAE encoding (fp32), context cached or from captions."""

from __future__ import annotations

import pytest
import torch
from data_helpers import EMB_DIM, IMAGE_SIZE, LATENT

from sd_mlperf.config.schema import Config
from sd_mlperf.data.conditioning import build_batch_conditioner
from sd_mlperf.models.vae import sample_latents


def _cfg(train_format: str) -> Config:
    cfg = Config()
    cfg.data.train_format = train_format
    return cfg


def test_moments_with_cached_context(tiny_vae):
    cond = build_batch_conditioner(_cfg("moments_embeddings"), tiny_vae, None)  # no text encoder needed
    moments = torch.randn(3, 8, LATENT, LATENT)
    context = torch.randn(3, 77, EMB_DIM)
    z0, ctx = cond({"moments": moments, "context": context}, generator=torch.Generator().manual_seed(1))
    expected = sample_latents(moments, Config().model.vae, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z0, expected) and z0.shape == (3, 4, LATENT, LATENT)
    assert ctx is context
    z1, _ = cond({"moments": moments, "context": context})
    assert not torch.equal(z0, z1)  # a fresh draw each time the sample is seen


def test_images_are_encoded_in_fp32_and_captions_by_the_text_encoder(tiny_vae, tiny_text_encoder):
    cond = build_batch_conditioner(_cfg("images"), tiny_vae, tiny_text_encoder)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    captions = ["a red circle on the left on a white background", "a blue square at the top on a black background"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's autocast must not reach the VAE
        z0, ctx = cond({"images": images, "captions": captions}, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moments = tiny_vae.encode_moments(images)
        expected = sample_latents(moments, Config().model.vae, generator=torch.Generator().manual_seed(2))
        assert torch.equal(z0, expected) and z0.dtype == torch.float32
        assert ctx.shape == (2, 77, EMB_DIM)


def test_missing_frozen_part_is_a_config_error(tiny_vae):
    with pytest.raises(ValueError, match="text encoder"):
        build_batch_conditioner(_cfg("moments"), tiny_vae, None)
    with pytest.raises(ValueError, match="VAE"):
        build_batch_conditioner(_cfg("images"), None, object())
