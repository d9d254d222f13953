"""`sd-mlperf precompute-latents --input SHARDS --output DIR`: raw image shards -> moments (+ text embeddings).

On N GPUs: `torchrun --nproc-per-node N -m sd_mlperf precompute-latents ...` (or one srun task per GPU);
the input shards are split across ranks, each rank on its local GPU (parallel.distributed.launch_dist_info:
the launcher's rank, no process group, run.device's rule). Without a launcher it runs in one process, on
CUDA if present (run.device). The output format is data.train_format.
"""

from __future__ import annotations

import argparse
import sys

from sd_mlperf.commands._common import add_config_arguments

NAME = "precompute-latents"
HELP = ("encode raw image shards with the frozen VAE (and text encoder) into training shards of format "
        "data.train_format (moments or moments_embeddings); resumable, splits shards across torchrun ranks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="DIR_OR_PATTERN",
                        help="raw shards: a folder, a glob or a brace pattern (/data/{00000..00831}.tar)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (same shard names and keys)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from sd_mlperf.config import ConfigError, merge_config, validate
    from sd_mlperf.data.precompute import precompute_shards
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders
    from sd_mlperf.parallel.distributed import launch_dist_info
    from sd_mlperf.utils.logging import show_progress_bar

    merged = merge_config(args.config, args.overrides)
    if OmegaConf.is_missing(merged.model, "frozen_checkpoint"):
        raise ConfigError("config key 'model.frozen_checkpoint' is required: set it to 512-base-ema.ckpt "
                          "(or null for random weights, for tests only).")
    if OmegaConf.is_missing(merged.data, "train_shards"):
        merged.data.train_shards = args.output  # where training will read the output; unused here
    validate(merged)
    model_cfg, data_cfg = OmegaConf.to_object(merged.model), OmegaConf.to_object(merged.data)
    dist = launch_dist_info(merged.run.device)  # the ranks never talk: no process group
    vae, text_encoder = build_frozen_encoders(model_cfg)
    vae.to(dist.device).eval()
    text_encoder = text_encoder.to(dist.device).eval() if data_cfg.train_format == "moments_embeddings" else None
    progress = show_progress_bar(merged.logging.progress_bar) and dist.is_main
    manifest = precompute_shards(args.input, args.output, data_cfg=data_cfg, vae=vae, text_encoder=text_encoder,
                                 rank=dist.rank, world_size=dist.world_size, progress=progress)
    if manifest is not None:
        sys.stdout.write(f"{manifest['samples']} samples in {manifest['num_shards']} shards -> {args.output} "
                         f"(format {manifest['format']}, skipped {manifest['skipped'] or 'none'})\n")
    return 0
