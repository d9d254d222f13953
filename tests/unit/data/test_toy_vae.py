"""The toy VAE: standardising its latents changes no picture; the fit is seeded, cached, and loads as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_mlperf.config import load_config
from sd_mlperf.config.errors import ConfigError
from sd_mlperf.data.synthetic import VAE_FIT_STREAM, ensure_synthetic_sources
from sd_mlperf.data.toy_vae import (
    RECIPE,
    ensure_toy_frozen_checkpoint,
    init_for_fitting,
    pictures,
    record_path,
    standardise_latents,
)
from sd_mlperf.models.vae import DiagonalGaussian

REPO = Path(__file__).resolve().parents[3]
TINY = ["data.synthetic.num_train_samples=4", "data.synthetic.num_train_shards=1", "data.synthetic.num_val_prompts=3",
        "data.synthetic.image_size=16", "data.image_size=16", "data.synthetic.fit_vae_steps=3"]


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    """One intra-op thread: the fit's numbers are reproducible for a given thread count."""


def _cfg(root: Path, *overrides: str):
    return load_config([REPO / "conf" / "learn.yaml"], [f"run.output_dir={root}", *TINY, *overrides])


def test_standardising_latents_changes_no_picture(tmp_path):
    from sd_mlperf.models.vae import build_vae

    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    vae = build_vae(cfg.model.vae).eval()
    init_for_fitting(vae, RECIPE.initial_logvar)
    images = pictures(0, VAE_FIT_STREAM, 0, 32, 16)
    with torch.no_grad():
        before = vae.decode(DiagonalGaussian(vae.encode_moments(images)).sample(torch.Generator().manual_seed(1)))
    standardise_latents(vae, images, torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = DiagonalGaussian(vae.encode_moments(images)).sample(torch.Generator().manual_seed(1))
        after = vae.decode(z)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4), rtol=1e-4, atol=0)


def test_fit_is_seeded_cached_and_loads_as_a_frozen_checkpoint(tmp_path):
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders, safe_load_state_dict

    cfg = _cfg(tmp_path / "a")
    ensure_synthetic_sources(cfg)
    ckpt = Path(cfg.model.frozen_checkpoint)
    assert ckpt.is_file() and record_path(ckpt).is_file()
    vae, text_encoder = build_frozen_encoders(cfg.model)  # strict: every first_stage_model/cond_stage_model key
    assert not any(p.requires_grad for p in vae.parameters())
    stamp = ckpt.stat().st_mtime_ns
    assert not ensure_toy_frozen_checkpoint(cfg)  # same settings: reused
    assert ckpt.stat().st_mtime_ns == stamp

    other = _cfg(tmp_path / "b")
    ensure_synthetic_sources(other)
    first, second = safe_load_state_dict(ckpt), safe_load_state_dict(other.model.frozen_checkpoint)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_new_fit_removes_latents_of_the_old_vae(tmp_path):
    cfg = _cfg(tmp_path)
    ensure_synthetic_sources(cfg)
    stale = Path(cfg.data.train_shards)
    stale.mkdir(parents=True)
    (stale / "00000.tar").write_bytes(b"old latents")
    assert not ensure_toy_frozen_checkpoint(cfg) and stale.exists()  # reused: the latents stay
    changed = _cfg(tmp_path, "data.synthetic.fit_vae_steps=2")
    assert ensure_toy_frozen_checkpoint(changed)
    assert not stale.exists()


def test_the_fitted_checkpoint_must_lie_in_the_synthetic_dir(tmp_path):
    with pytest.raises(ConfigError, match="model.frozen_checkpoint.*inside data.synthetic_dir"):
        _cfg(tmp_path, f"model.frozen_checkpoint={tmp_path / 'elsewhere.safetensors'}")
    with pytest.raises(ConfigError, match="data.synthetic.fit_vae_steps"):
        _cfg(tmp_path, "data.synthetic.fit_vae_steps=-1")
