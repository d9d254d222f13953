"""One memory format end to end: every convolution of the UNet sees its model's format (no silent mixing)."""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models.unet import build_unet


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_conv_input_has_the_model_format(channels_last):
    cfg = UNetConfig(model_channels=16, channel_mult=[1, 2], attention_levels=[0, 1], head_channels=8,
                     context_dim=8, resblock_norm_groups=4, transformer_norm_groups=4, channels_last=channels_last,
                     attention_backend="sdpa", norm_backend="torch")
    unet = build_unet(cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    seen: list[tuple[str, bool]] = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            assert module.weight.is_contiguous(memory_format=fmt), name
            module.register_forward_pre_hook(
                lambda m, args, name=name: seen.append((name, args[0].is_contiguous(memory_format=fmt))))
    unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 8))
    assert len(seen) == sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    mixed = [name for name, ok in seen if not ok]
    assert not mixed, f"convolutions fed another memory format: {mixed}"
