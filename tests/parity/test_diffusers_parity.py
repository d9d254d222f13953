"""Independent numerics check: our tiny UNet and VAE against diffusers' SD2 classes on the same weights.

The weights go through diffusers' own ldm single-file converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`), so this also checks that our names are the ldm layout those
converters read. diffusers is an optional dependency (`pip install 'sd_mlperf[bench]'`).
diffusers uses one GroupNorm group count for ResBlocks and SpatialTransformer inputs, so the
tiny configs use the same count for both (the MLPerf 16/32 split is tested in tests/unit/models).
"""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.config.schema import UNetConfig, VAEConfig
from sd_mlperf.models.unet import build_unet
from sd_mlperf.models.vae import build_vae

diffusers = pytest.importorskip("diffusers", reason="diffusers is optional (pip install 'sd_mlperf[bench]')")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils",
                                  reason="this diffusers has no ldm single-file converters")


def _randomize(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_unet_matches_diffusers():
    cfg = UNetConfig(model_channels=16, channel_mult=[1, 2, 2], attention_levels=[0, 1], head_channels=8,
                     context_dim=24, resblock_norm_groups=4, transformer_norm_groups=4, attention_backend="math",
                     norm_backend="torch")
    ours = build_unet(cfg)
    _randomize(ours)
    theirs = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads (SD2: 5, 10, 20, 20)
        cross_attention_dim=24, norm_num_groups=4, use_linear_projection=True, flip_sin_to_cos=True,
        freq_shift=0,
    ).eval()
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = single_file.convert_ldm_unet_checkpoint(ldm, dict(theirs.config))
    theirs.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([1, 981])
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert want.abs().max() > 0
    assert rel_err(got, want) < 1e-5


def test_vae_matches_diffusers():
    cfg = VAEConfig(base_channels=8, channel_mult=[1, 1, 2, 2], norm_groups=4)
    ours = build_vae(cfg)
    _randomize(ours)
    theirs = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=16,
    ).eval()
    ldm = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(single_file.convert_ldm_vae_checkpoint(ldm, dict(theirs.config)), strict=True)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moments_want = theirs.encode(x).latent_dist.parameters
        moments_got = ours.encode_moments(x)
        z = moments_got[:, :4]
        img_want, img_got = theirs.decode(z).sample, ours.decode(z)
    assert rel_err(moments_got, moments_want) < 1e-5
    assert rel_err(img_got, img_want) < 1e-5
