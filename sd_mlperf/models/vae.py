"""The frozen VAE (ldm AutoencoderKL, f=8) and the reference's latent draw.

Shapes: B batch, H/W image size, h/w = H/8, W/8 latent size.
Names equal the `first_stage_model.*` rows of fixtures/sd2_512_base_ema_keys.tsv (83,653,863
parameters at the reference config). GroupNorm(32, eps 1e-6) everywhere; the swish after a
norm is fused into the norm module (TorchGroupNorm act="silu"), which holds no extra weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd_mlperf.config.schema import VAEConfig
from sd_mlperf.models.blocks import Upsample  # the same nearest x2 + conv as the UNet
from sd_mlperf.models.norm import TorchGroupNorm


class ResnetBlock(nn.Module):
    """norm1+swish, conv1, norm2+swish, dropout(0), conv2; nin_shortcut (1x1) when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = TorchGroupNorm(groups, in_channels, eps, act="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = TorchGroupNorm(groups, out_channels, eps, act="silu")
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block without time embedding."""
        h = self.conv2(self.dropout(self.norm2(self.conv1(self.norm1(x)))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv q/k/v/proj_out."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm = TorchGroupNorm(groups, channels, eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(C)) v, one head of width C, plus the input."""
        B, C, H, W = x_BCHW.shape
        h = self.norm(x_BCHW)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C); same math as the reference's bmm+softmax
        return x_BCHW + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Pad (0,1,0,1), then 3x3 conv stride 2 without padding (ldm's asymmetric downsample)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve H and W."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, eps)
        self.attn_1 = AttnBlock(channels, groups, eps)
        self.block_2 = ResnetBlock(channels, channels, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` list, empty `attn` list (no per-level attention), optional resampler."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)  # ldm names it `downsample` / `upsample`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> (B, 2*z_channels, h, w) (double_z)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, eps, ch = cfg.norm_groups, cfg.norm_eps, cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        mults = [1, *cfg.channel_mult]
        self.down = nn.ModuleList()
        for i in range(len(cfg.channel_mult)):
            c_in, c_out = ch * mults[i], ch * mults[i + 1]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, g, eps) for j in range(cfg.num_res_blocks)]
            last = i == len(cfg.channel_mult) - 1
            self.down.append(_Level(blocks, None if last else Downsample(c_out), "downsample"))
        top = ch * cfg.channel_mult[-1]
        self.mid = _Mid(top, g, eps)
        self.norm_out = TorchGroupNorm(g, top, eps, act="silu")
        self.conv_out = nn.Conv2d(top, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode to moments before quant_conv."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.norm_out(self.mid(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, H, W)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, eps, ch = cfg.norm_groups, cfg.norm_eps, cfg.base_channels
        top = ch * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = _Mid(top, g, eps)
        levels: list[nn.Module] = []
        c_in = top
        for i in reversed(range(len(cfg.channel_mult))):
            c_out = ch * cfg.channel_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, g, eps) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, _Level(blocks, Upsample(c_out) if i != 0 else None, "upsample"))
            c_in = c_out
        self.up = nn.ModuleList(levels)  # indexed by level, as ldm's up.insert(0, ...)
        self.norm_out = TorchGroupNorm(g, c_in, eps, act="silu")
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode (after post_quant_conv)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(self.norm_out(h))


class AutoencoderKL(nn.Module):
    """Frozen KL autoencoder: encode_moments (mean || logvar) and decode."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Moments (B, 2*embed_dim, H/8, W/8): mean || logvar, after quant_conv."""
        return self.quant_conv(self.encoder(images_BCHW))

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from unscaled latents (the caller divides by scale_factor first)."""
        return self.decoder(self.post_quant_conv(z_BCHW))

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """encode_moments (the only use of the VAE in training)."""
        return self.encode_moments(images_BCHW)


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) from moments, logvar clamped as the reference does."""

    def __init__(self, moments: torch.Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, logvar_min, logvar_max)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * N(0, 1), a fresh draw each call."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mean."""
        return self.mean


def sample_latents(moments: torch.Tensor, cfg: VAEConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = (mean + exp(0.5 clamp(logvar)) * N(0,1)) * scale_factor (REFERENCE.md, "Diffusion and loss")."""
    return DiagonalGaussian(moments, cfg.logvar_min, cfg.logvar_max).sample(generator) * cfg.scale_factor


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """Build the AutoencoderKL from `model.vae` (random weights; load_frozen_encoders fills them)."""
    return AutoencoderKL(cfg)
