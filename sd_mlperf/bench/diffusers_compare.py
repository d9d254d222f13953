"""Our UNet training step against diffusers' UNet2DConditionModel of the same shape (optional dependency).

diffusers is a bench-only dependency (`pip install 'sd_mlperf[bench]'`), never a runtime one.
Both models go through the same step (the trainer's, built by bench/train.py: noise, v-loss,
backward, fused AdamW of the data-parallel backend), the same inputs and the same precision.
Before timing, our random weights are converted with diffusers' own ldm converter into its model
and the outputs are compared, so the rows measure the same function, not two look-alikes. The
steps are interleaved (ours, theirs, ours, ...) so that a change in machine load hits both sides
equally.

diffusers has one `norm_num_groups` for ResBlocks and SpatialTransformer inputs; the output check
needs `model.unet.resblock_norm_groups == model.unet.transformer_norm_groups` (the MLPerf model
uses 16 and 32; a group count changes no parameter and no matmul).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sd_mlperf.bench import bench_seed
from sd_mlperf.bench.train import (
    SINGLE_PROCESS,
    TrainBenchSettings,
    build_runner,
    describe,
    synthetic_batch,
    threads_as_configured,
    time_steps,
)
from sd_mlperf.config.load import latent_size, load_config
from sd_mlperf.config.schema import Config, UNetConfig
from sd_mlperf.models.flops import unet_train_flops
from sd_mlperf.parallel.distributed import pick_device
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger
from sd_mlperf.utils.manifest import count_parameters

COLUMNS = ("time_vs_diffusers", "max_abs_diff")
"""Extra columns of the comparison rows: step time relative to diffusers, output difference."""


def diffusers_unet_kwargs(u: UNetConfig) -> dict[str, Any]:
    """UNet2DConditionModel arguments for the same topology as our `model.unet` section."""
    levels = range(len(u.channel_mult))
    channels = tuple(u.model_channels * m for m in u.channel_mult)
    attn = [level in u.attention_levels for level in levels]
    return {
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "block_out_channels": channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "layers_per_block": u.num_res_blocks,
        # diffusers' `attention_head_dim` holds head COUNTS (a known misnomer), as in SD2's config.
        "attention_head_dim": tuple(c // u.head_channels for c in channels),
        "transformer_layers_per_block": u.transformer_depth,
        "cross_attention_dim": u.context_dim,
        "use_linear_projection": True,
        "norm_num_groups": u.resblock_norm_groups,
        "norm_eps": u.resblock_norm_eps,
        "flip_sin_to_cos": True,  # ldm's [cos, sin] order
        "freq_shift": 0,
    }


class DiffusersUNet(nn.Module):
    """diffusers UNet2DConditionModel behind our forward(x, t, context) -> v signature."""

    def __init__(self, u: UNetConfig) -> None:
        super().__init__()
        try:
            from diffusers import UNet2DConditionModel
        except ImportError as exc:
            raise UserError(f"--diffusers needs diffusers ({exc}); pip install 'sd_mlperf[bench]'") from exc
        self.unet = UNet2DConditionModel(**diffusers_unet_kwargs(u))

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, context_BSE: torch.Tensor) -> torch.Tensor:
        """diffusers' forward, returning the plain tensor."""
        return self.unet(x_BCHW, t_B, encoder_hidden_states=context_BSE, return_dict=False)[0]


def load_ours_into_diffusers(ours: nn.Module, theirs: DiffusersUNet) -> None:
    """Copy our (ldm-named) weights into the diffusers model with diffusers' own converter, strictly."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ldm, theirs.unet.config)
    theirs.unet.load_state_dict(converted, strict=True)


@torch.no_grad()
def max_output_difference(u: UNetConfig, batch: dict[str, torch.Tensor], seed: int = 0) -> float | None:
    """Max |ours - diffusers| in fp32 for random (not zero-initialised) weights; None if groups differ."""
    import dataclasses

    from sd_mlperf.models.unet import build_unet

    if u.resblock_norm_groups != u.transformer_norm_groups:
        return None
    u = dataclasses.replace(u, compile=False)
    torch.manual_seed(seed)
    ours = build_unet(u).eval()
    for p in ours.parameters():  # the zero-initialised output layers would make both outputs 0
        p.normal_(0.0, 0.05)
    theirs = DiffusersUNet(u).eval()
    load_ours_into_diffusers(ours, theirs)
    x = batch["z0"][:1].float().cpu()
    t = torch.tensor([500])
    ctx = batch["context"][:1].float().cpu()
    return float((ours.cpu()(x, t, ctx) - theirs(x, t, ctx)).abs().max())


def compare_with_diffusers(config_files: Sequence[str], overrides: Sequence[str],
                           settings: TrainBenchSettings | None = None) -> list[dict[str, Any]]:
    """Two rows, ours and diffusers', timed interleaved in the same step; `time_vs_diffusers` = ours/theirs."""
    settings = settings or TrainBenchSettings()
    cfg = load_config(config_files, [*overrides, *SINGLE_PROCESS])
    if cfg.training.cuda_graph:
        raise ValueError("--diffusers compares eager steps; set training.cuda_graph=false for it")
    with threads_as_configured(cfg):
        return _compare(cfg, settings)


def _compare(cfg: Config, settings: TrainBenchSettings) -> list[dict[str, Any]]:
    device = pick_device(cfg.run.device)
    torch.manual_seed(bench_seed(cfg))
    batch = synthetic_batch(cfg, device)
    diff = max_output_difference(cfg.model.unet, batch, bench_seed(cfg))
    logger.info("bench train --diffusers: max |ours - diffusers| = %s (fp32, random weights)", diff)
    ours_unet, _, ours = build_runner(cfg, device, batch, settings.warmup_steps)
    theirs_model = DiffusersUNet(cfg.model.unet).to(device)
    if cfg.model.unet.channels_last:  # the same fast-path choices as ours get
        theirs_model.to(memory_format=torch.channels_last)
    if cfg.model.unet.compile:
        theirs_model.compile()  # as models/unet.py compiles ours
    _, _, theirs = build_runner(cfg, device, batch, settings.warmup_steps, unet=theirs_model)
    n_ours, n_theirs = count_parameters(ours_unet), count_parameters(theirs_model)
    if n_ours != n_theirs:
        raise RuntimeError(f"--diffusers: the models differ ({n_ours:,} vs {n_theirs:,} parameters); "
                           "the mapping in diffusers_unet_kwargs does not cover this config")
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for _ in range(settings.steps):
        for name, runner in (("ours", ours), ("diffusers", theirs)):
            times[name] += time_steps(runner, batch, 1, device)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    u, batch_size = cfg.model.unet, cfg.training.micro_batch_size
    flop_per_image = unet_train_flops(u, latent_size=latent_size(cfg),
                                      context_length=cfg.model.text_encoder.context_length)
    common = {**describe(cfg, device), "tflop_per_image": flop_per_image / 1e12}
    chosen = {r.role: r.name for r in ours_unet.backend_resolutions}
    backends = {"ours": (chosen["attention"], chosen["norm"]), "diffusers": ("sdpa (AttnProcessor2_0)", "torch")}
    names = {"ours": f"ours ({n_ours:,} params)", "diffusers": "diffusers UNet2DConditionModel"}
    rows = [{"variant": names[k], **common, "attention": backends[k][0], "norm": backends[k][1],
             "ms_per_step": med[k] * 1e3, "ms_min": min(times[k]) * 1e3, "images_per_s": batch_size / med[k],
             "tflop_per_s": flop_per_image * batch_size / med[k] / 1e12,
             "time_vs_diffusers": med[k] / med["diffusers"], "max_abs_diff": diff, "status": "ok"}
            for k in ("ours", "diffusers")]
    return rows
