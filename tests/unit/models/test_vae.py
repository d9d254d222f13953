"""VAE: full-size structure on meta; tiny numerics; the reference latent draw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd_mlperf.config.schema import VAEConfig
from sd_mlperf.models.vae import AttnBlock, DiagonalGaussian, build_vae, sample_latents
from sd_mlperf.utils.manifest import count_parameters, read_manifest, state_dict_manifest

TINY = dict(base_channels=8, channel_mult=[1, 1, 2, 2], norm_groups=4)


@pytest.fixture(scope="module")
def full_vae():
    with torch.device("meta"):
        return build_vae(VAEConfig())


def test_full_size_matches_checkpoint_manifest(full_vae, fixtures_dir):
    expected = read_manifest(fixtures_dir / "sd2_512_base_ema_keys.tsv", prefix="first_stage_model.")
    assert state_dict_manifest(full_vae) == expected
    assert count_parameters(full_vae) == 83_653_863


def test_full_size_group_norms(full_vae):
    norms = [m for m in full_vae.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all((m.num_groups, m.eps) == (32, 1e-6) for m in norms)


def test_tiny_shapes_f8_and_backward():
    vae = build_vae(VAEConfig(**TINY))
    x = torch.rand(2, 3, 16, 16)
    moments = vae.encode_moments(x)
    assert moments.shape == (2, 8, 2, 2)  # mean || logvar at H/8
    img = vae.decode(moments[:, :4])
    assert img.shape == (2, 3, 16, 16)
    img.mean().backward()
    assert all(p.grad is not None for p in vae.decoder.parameters())


def test_attn_block_matches_reference_bmm_formulation():
    torch.manual_seed(0)
    block = AttnBlock(8, 4, 1e-6)
    x = torch.randn(2, 8, 3, 5)
    # ldm's AttnBlock: bmm(q^T, k) * c^-0.5, softmax over keys, bmm(v, w^T).
    h = block.norm(x)
    q, k, v = block.q(h), block.k(h), block.v(h)
    b, c, hh, ww = q.shape
    w_ = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
    w_ = w_.softmax(dim=2)
    out = torch.bmm(v.reshape(b, c, -1), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    torch.testing.assert_close(block(x), x + block.proj_out(out), rtol=1e-5, atol=1e-5)


def test_diagonal_gaussian_clamps_and_draws_fresh_noise():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full((2, 4, 3, 3), 50.0)
    logvar[1] = -100.0
    dist = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert dist.logvar[0].max() == 20.0 and dist.logvar[1].min() == -30.0
    torch.testing.assert_close(dist.std, torch.exp(0.5 * dist.logvar))
    a, b = dist.sample(), dist.sample()
    assert not torch.equal(a, b)


def test_sample_latents_is_reference_formula():
    cfg = VAEConfig()
    moments = torch.randn(3, 8, 4, 4)
    z = sample_latents(moments, cfg, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    torch.testing.assert_close(z, (mean + torch.exp(0.5 * logvar) * noise) * 0.18215)
