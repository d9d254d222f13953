"""UNet building blocks in the ldm layout: time embedding, ResBlock, SpatialTransformer, Down/Upsample.

Shapes: B batch, C channels, H/W spatial size, L = H*W tokens, S context tokens, E context width.
Submodule names and Sequential indices are those of ldm's openaimodel.py / attention.py, so
`model.diffusion_model.*` checkpoints load strictly. Numerics follow REFERENCE.md ("Model").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sd_mlperf.models.attention import CrossAttention
from sd_mlperf.models.norm import GroupNormFactory


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args_BF = t_B[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args_BF), torch.sin(args_BF)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter (the reference's zero-initialised output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN+SiLU, conv3x3; + Linear(SiLU(emb)); GN+SiLU, dropout(0), zero conv3x3; skip identity or 1x1."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, norm: GroupNormFactory,
                 num_groups: int, eps: float) -> None:
        super().__init__()
        # SiLU is fused into the norm (act="silu"); Identity keeps the ldm index of the SiLU slot.
        self.in_layers = nn.Sequential(
            norm(num_groups=num_groups, num_channels=channels, eps=eps, act="silu"),
            nn.Identity(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            norm(num_groups=num_groups, num_channels=out_channels, eps=eps, act="silu"),
            nn.Identity(),
            nn.Dropout(0.0),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x_BCHW: torch.Tensor, emb_BE: torch.Tensor) -> torch.Tensor:
        """No scale-shift norm: the embedding is added after in_layers."""
        h = self.in_layers(x_BCHW)
        h = h + self.emb_layers(emb_BE).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x_BCHW) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 conv, stride 2, padding 1 (ldm `op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Halve H and W."""
        return self.op(x_BCHW)


class Upsample(nn.Module):
    """Nearest x2, then 3x3 conv (ldm `conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Double H and W."""
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


class GEGLU(nn.Module):
    """Linear C -> 2*inner split into value and gate: value * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """value * gelu(gate)."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU (C -> 4C), dropout(0), Linear 4C -> C (ldm `net.0`, `net.2`)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward sublayer."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN1 x); x += attn2(LN2 x, ctx); x += FF(LN3 x). Attribute order = ldm state-dict order."""

    def __init__(self, dim: int, num_heads: int, head_channels: int, context_dim: int, attention_backend: str
                 ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, num_heads, head_channels, attention_backend)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, num_heads, head_channels, attention_backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x_BLC: torch.Tensor, context_BSE: torch.Tensor) -> torch.Tensor:
        """Self-attention, cross-attention, feed-forward, each pre-norm and residual."""
        x_BLC = x_BLC + self.attn1(self.norm1(x_BLC))
        x_BLC = x_BLC + self.attn2(self.norm2(x_BLC), context_BSE)
        return x_BLC + self.ff(self.norm3(x_BLC))


class SpatialTransformer(nn.Module):
    """GN(32, eps 1e-6), Linear proj_in, transformer blocks, zero-initialised Linear proj_out, residual."""

    def __init__(self, channels: int, num_heads: int, head_channels: int, *, depth: int, context_dim: int,
                 norm: GroupNormFactory, num_groups: int, eps: float, attention_backend: str) -> None:
        super().__init__()
        inner = num_heads * head_channels
        self.norm = norm(num_groups=num_groups, num_channels=channels, eps=eps, act="")
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_heads, head_channels, context_dim, attention_backend)
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, x_BCHW: torch.Tensor, context_BSE: torch.Tensor) -> torch.Tensor:
        """Tokens = pixels: norm, (B, H*W, C), blocks, back to BCHW, add the input."""
        B, C, H, W = x_BCHW.shape
        h = self.norm(x_BCHW)
        h_BLC = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
        for block in self.transformer_blocks:
            h_BLC = block(h_BLC, context_BSE)
        h_BLC = self.proj_out(h_BLC)
        # (B, H, W, C) permuted is an NHWC view. The input goes first in the sum, whose result takes the
        # first operand's memory format: an NCHW model stays NCHW (else every later conv would mix formats).
        return x_BCHW + h_BLC.view(B, H, W, C).permute(0, 3, 1, 2)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to ResBlocks and the context to SpatialTransformers."""

    use_checkpoint: bool = False

    def _run(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Run the layers; recompute them in backward when activation checkpointing is on."""
        if self.use_checkpoint and torch.is_grad_enabled():
            # No RNG state to preserve: the UNet draws no random numbers (its dropouts have p=0, which returns the
            # input without a draw). Preserving it would read the CUDA RNG state, which torch before 2.10 refuses
            # inside a CUDA-graph capture (training.cuda_graph with activation checkpointing).
            return checkpoint(self._run, x, emb, context, use_reentrant=False, preserve_rng_state=False)
        return self._run(x, emb, context)
