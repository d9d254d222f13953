"""FLOP counting on the real model and the MFU peak table."""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models.flops import count_flops, peak_tflops, unet_train_flops


def test_count_flops_of_a_linear_forward_and_backward():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    fwd = 2 * 4 * 8 * 16
    assert count_flops(lambda: lin(x)) == fwd
    # backward: grad of input and grad of weight, one matmul each
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * fwd


def test_reference_unet_costs_2_41_tflop_per_trained_image():
    # REFERENCE.md ("Best known results"): 2.41 TFLOP per trained image at 64x64 latents.
    flops = unet_train_flops(UNetConfig(), latent_size=64, context_length=77)
    assert flops / 1e12 == pytest.approx(2.41, abs=0.005)


def test_flops_scale_with_batch():
    tiny = UNetConfig(model_channels=16, channel_mult=[1, 2], attention_levels=[1], head_channels=8,
                      context_dim=16, resblock_norm_groups=4, transformer_norm_groups=4)
    one = unet_train_flops(tiny, latent_size=8, context_length=5)
    assert one > 0
    assert unet_train_flops(tiny, latent_size=8, context_length=5, batch_size=3) == 3 * one


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "fp16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "fp16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA B200", "fp16", 2250.0),
    ("NVIDIA H100 80GB HBM3", "fp32", None),
    ("cpu x86_64 x2", "fp16", None),
    ("NVIDIA GeForce RTX 4090", "fp16", None),
])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak
