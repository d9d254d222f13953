"""The SD2 UNet (ldm openaimodel layout, MLPerf settings), built from `model.unet`.

Shapes: B batch, C latent channels, H/W latent size, S context tokens, E context width.
At the reference config: 865,910,724 parameters whose names, shapes and dtypes equal the
`model.diffusion_model.*` rows of fixtures/sd2_512_base_ema_keys.tsv (prefix removed), in
the same order. Backends (core attention, GroupNorm) are resolved once here and recorded in
`backend_resolutions`; they never change parameter names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch
from torch import nn

from sd_mlperf.backends import (
    APEX_NEEDS_NHWC,
    HALF_PRECISIONS,
    TE_COMPILE_REASON,
    BackendUnavailable,
    Resolution,
    attention_unsuitable,
    resolve_backend,
    summarize,
)
from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models.blocks import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    timestep_embedding,
    zero_module,
)
from sd_mlperf.models.norm import NormBuilder
from sd_mlperf.utils.logging import log_once, logger


class UNetModel(nn.Module):
    """v-prediction UNet: forward(x_BCHW, timesteps_B, context_BSE) -> v_BCHW."""

    def __init__(self, cfg: UNetConfig, *, attention_backend: str, norm: NormBuilder) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        res = dict(norm=norm, num_groups=cfg.resblock_norm_groups, eps=cfg.resblock_norm_eps)

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, ch // cfg.head_channels, cfg.head_channels, depth=cfg.transformer_depth,
                                      context_dim=cfg.context_dim, norm=norm, num_groups=cfg.transformer_norm_groups,
                                      eps=cfg.transformer_norm_eps, attention_backend=attention_backend)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        num_levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mc * mult, **res)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != num_levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch, **res), transformer(ch),
                                                    ResBlock(ch, emb_ch, ch, **res))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, mc * mult, **res)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        assert not skip_channels, "every encoder activation is consumed by the decoder"

        self.out = nn.Sequential(
            norm(num_groups=cfg.resblock_norm_groups, num_channels=ch, eps=cfg.resblock_norm_eps, act="silu"),
            nn.Identity(),  # the SiLU slot (`out.1`); the SiLU runs inside the norm
            zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)),
        )
        self.backend_resolutions: list[Resolution] = []

    def forward(self, x_BCHW: torch.Tensor, timesteps_B: torch.Tensor, context_BSE: torch.Tensor) -> torch.Tensor:
        """Predict v for noisy latents at the given timesteps, conditioned on the text context."""
        emb = self.time_embed(timestep_embedding(timesteps_B, self.cfg.model_channels))
        if self.cfg.channels_last:
            x_BCHW = x_BCHW.contiguous(memory_format=torch.channels_last)
        h = x_BCHW
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context_BSE)
            skips.append(h)
        h = self.middle_block(h, emb, context_BSE)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context_BSE)
        return self.out(h)


def apply_activation_checkpointing(unet: UNetModel) -> None:
    """Recompute every input/middle/output block in backward (saves activation memory)."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for block in blocks:
        block.use_checkpoint = True
    logger.info("activation checkpointing on %d UNet blocks", len(blocks))


def apply_channels_last(unet: UNetModel) -> None:
    """Store conv weights channels-last; forward then keeps activations NHWC (apex GroupNorm needs it)."""
    unet.to(memory_format=torch.channels_last)


def apply_compile(unet: UNetModel) -> None:
    """torch.compile the UNet in place (nn.Module.compile keeps state-dict names, unlike torch.compile(m)).

    Inductor's cache (TORCHINDUCTOR_CACHE_DIR; slurm/run_and_time.sh puts it on node-local disk, one folder per
    job) makes runs 2..N of one `--num-runs` job load their kernels instead of compiling them.
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    unet.compile()
    logger.info("UNet wrapped in torch.compile (compiled by the step's warm_up, before run_start; inductor cache %s)",
                cache_dir())


def _resolve_attention(cfg: UNetConfig, compute_precisions: Mapping[str, str] | None) -> Resolution:
    unsuitable = attention_unsuitable(compute_precisions, compiled=cfg.compile)
    if cfg.attention_backend == "te" and unsuitable.get("te") == TE_COMPILE_REASON:
        raise ValueError(f"model.unet.attention_backend=te cannot serve this build: {unsuitable['te']}. Set "
                         "model.unet.attention_backend=auto (sdpa) or model.unet.compile=false.")
    if cfg.attention_backend == "te" and "te" in unsuitable:
        # An error, not a warning: TE's fused and flash kernels refuse fp32, and its unfused fallback
        # materialises B x H x L^2 fp32 scores: many times slower than sdpa's fp32 kernels and near OOM at
        # SD2 size. No run wants that path, so naming te with fp32 compute is a config mistake.
        fp32 = [key for key, value in (compute_precisions or {}).items() if value not in HALF_PRECISIONS]
        raise ValueError(
            "model.unet.attention_backend=te cannot compute in fp32 (" + ", ".join(f"{k}=fp32" for k in fp32)
            + "): TE's fused and flash kernels need fp16/bf16, and its unfused fallback materialises B x H x L^2 "
            "fp32 scores (very slow, near OOM at 64x64 latents). Set model.unet.attention_backend=sdpa (or auto), "
            "or set " + " and ".join(f"{k}=fp16" for k in fp32) + " (or bf16).")
    return resolve_backend("attention", cfg.attention_backend, unsuitable=unsuitable)


def _resolve_norm(cfg: UNetConfig) -> Resolution:
    if cfg.norm_backend == "apex" and not cfg.channels_last:
        # apex's kernel reads NHWC only; without channels-last every call would fall back to torch.
        raise ValueError("model.unet.norm_backend=apex needs NHWC activations but model.unet.channels_last=false;"
                         " set model.unet.channels_last=true (or model.unet.norm_backend=torch).")
    unsuitable = None if cfg.channels_last else {"apex": APEX_NEEDS_NHWC}
    return resolve_backend("norm", cfg.norm_backend, unsuitable=unsuitable)


def _build_norm(cfg: UNetConfig) -> tuple[NormBuilder, Resolution]:
    """The norm builder of the resolved backend; `auto` falls back to torch if apex fails to import."""
    res = _resolve_norm(cfg)
    if res.name != "apex":
        return NormBuilder(res.name), res
    try:
        return NormBuilder("apex"), res
    except BackendUnavailable as exc:
        if cfg.norm_backend == "apex":
            raise
        # The probe saw apex and its extensions on disk, but they do not load (e.g. built for another torch).
        reason = f"apex.contrib.group_norm cannot be imported: {exc.__cause__ or exc}"
        log_once("norm:apex-import", f"model.unet.norm_backend=auto: {reason}; using torch GroupNorm",
                 level=logging.WARNING)
        return NormBuilder("torch"), dataclasses.replace(res, name="torch", why=f"auto: apex skipped ({reason})")


def build_unet(cfg: UNetConfig, *, compute_precisions: Mapping[str, str] | None = None) -> UNetModel:
    """Build the UNet: resolve backends, construct, apply channels-last and activation checkpointing.

    Args:
        compute_precisions: every precision this module will compute in, by the config key that sets
            it (`{"training.precision": "fp16", "eval.precision": "fp16"}`: the inline evaluator runs
            the same module). `auto` takes te only if all are fp16/bf16; a named te with an fp32 one is
            an error. None (tools, tests) leaves te to `auto` wherever it is available.
    """
    attention = _resolve_attention(cfg, compute_precisions)
    norm, norm_res = _build_norm(cfg)
    unet = UNetModel(cfg, attention_backend=attention.name, norm=norm)
    if norm_res.name == "apex":
        norm_res = dataclasses.replace(norm_res, why=norm_res.why + f"; {norm.summary()}")
    norm.log_summary()
    unet.backend_resolutions = [attention, norm_res]
    # DEBUG: the caller logs the run's one backends line (build_trainer adds parallel and names the file with reasons).
    logger.debug("UNet %s", summarize(unet.backend_resolutions))
    if cfg.channels_last:
        apply_channels_last(unet)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(unet)
    if cfg.compile:
        apply_compile(unet)
    return unet
