"""Core-attention backends against the reference (`math`) on random inputs, per dtype.

`te` needs Transformer Engine and a GPU: its parity runs in tests/gpu/test_models_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models.attention import CrossAttention, MathAttention, SDPAttention, build_core_attention
from sd_mlperf.models.unet import build_unet


def qkv(dtype: torch.dtype, heads: int = 4, dim: int = 16, L: int = 33, S: int = 77, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, L, heads, dim, generator=g).to(dtype)
    k = torch.randn(2, S, heads, dim, generator=g).to(dtype)
    v = torch.randn(2, S, heads, dim, generator=g).to(dtype)
    return q, k, v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_math_is_explicit_softmax():
    q, k, v = qkv(torch.float64)
    out = MathAttention(num_heads=4, head_channels=16)(q.float(), k.float(), v.float())
    # Hand-written reference: per head, softmax(q k^T / sqrt(d)) v, in float64.
    logits = torch.einsum("blhd,bshd->bhls", q, k) / 4.0
    want = torch.einsum("bhls,bshd->blhd", logits.softmax(-1), v)
    assert rel_err(out, want) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_sdpa_matches_math(dtype, tol):
    q, k, v = qkv(dtype)
    ref = MathAttention(num_heads=4, head_channels=16)(q, k, v)
    out = SDPAttention(num_heads=4, head_channels=16)(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < tol


def test_self_and_cross_attention_layers_match():
    torch.manual_seed(0)
    layers = {name: CrossAttention(32, 24, 4, 8, name) for name in ("math", "sdpa")}
    layers["sdpa"].load_state_dict(layers["math"].state_dict())
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    torch.testing.assert_close(layers["sdpa"](x, ctx), layers["math"](x, ctx), rtol=1e-5, atol=1e-6)
    self_layer = {n: CrossAttention(32, None, 4, 8, n) for n in ("math", "sdpa")}
    self_layer["sdpa"].load_state_dict(self_layer["math"].state_dict())
    torch.testing.assert_close(self_layer["sdpa"](x), self_layer["math"](x), rtol=1e-5, atol=1e-6)


def test_backends_have_identical_state_dicts():
    cfg = dict(model_channels=16, channel_mult=[1, 2], attention_levels=[0, 1], head_channels=8, context_dim=24,
               resblock_norm_groups=4, transformer_norm_groups=8, norm_backend="torch")
    sds = []
    for backend in ("math", "sdpa"):
        torch.manual_seed(3)  # backends hold no parameters and draw no random numbers: same init
        sds.append(build_unet(UNetConfig(**cfg, attention_backend=backend)).state_dict())
    assert [(k, v.shape, v.dtype) for k, v in sds[0].items()] == [(k, v.shape, v.dtype) for k, v in sds[1].items()]
    assert all(torch.equal(v, sds[1][k]) for k, v in sds[0].items())


def test_tiny_unet_sdpa_vs_math():
    cfg = dict(model_channels=16, channel_mult=[1, 2], attention_levels=[0, 1], head_channels=8, context_dim=24,
               resblock_norm_groups=4, transformer_norm_groups=8, norm_backend="torch")
    a = build_unet(UNetConfig(**cfg, attention_backend="math"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in a.parameters():  # non-zero everywhere so attention reaches the output
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    b = build_unet(UNetConfig(**cfg, attention_backend="sdpa"))
    b.load_state_dict(a.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 24)
    ref, out = a(x, t, ctx), b(x, t, ctx)
    assert ref.abs().max() > 0
    assert rel_err(out, ref) < 1e-5


def test_te_head_size_limits_checked_at_build():
    with pytest.raises(ValueError, match="head_channels=12"):
        build_core_attention("te", num_heads=2, head_channels=12)
