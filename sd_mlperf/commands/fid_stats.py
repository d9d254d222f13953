"""`sd-mlperf fid-stats --images DIR --out stats.npz`: FID reference statistics of a folder of images.

The same computation as pytorch-fid's `--save-stats` with the FID Inception: every image file of the
folder (sorted by name), RGB, float [0, 1], 2048-d pool features, mu / sigma in float64, saved as an
npz with keys mu and sigma (the format of MLCommons' val2014_30k_stats.npz).
"""

from __future__ import annotations

import argparse
import sys

from sd_mlperf.commands._common import add_config_arguments

NAME = "fid-stats"
HELP = "compute FID reference statistics (mu, sigma npz) of a folder of images with the FID Inception"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images (png, jpg, ...)")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .npz (written atomically)")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help="pt_inception-2015-12-05-6726825d.pth (default: eval.inception_weights of the config)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default 50)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto (default): cuda when present, as run.device")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omegaconf import OmegaConf

    from sd_mlperf.config import merge_config
    from sd_mlperf.data.coco import write_fid_stats
    from sd_mlperf.eval.fid import image_folder_stats
    from sd_mlperf.eval.inception import load_fid_inception
    from sd_mlperf.parallel.distributed import pick_device
    from sd_mlperf.utils.logging import logger

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"--out {out} exists; pass --force to overwrite it")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    weights = args.inception_weights
    if weights is None:
        merged = merge_config(args.config, args.overrides)
        if OmegaConf.is_missing(merged.eval, "inception_weights"):
            raise ValueError("no Inception weights: pass --inception-weights FILE or set eval.inception_weights "
                             "(null = random weights, smoke tests only)")
        weights = merged.eval.inception_weights
    device = pick_device(args.device)  # one process: GPU 0 of those visible
    inception = load_fid_inception(weights, device)
    mu, sigma = image_folder_stats(args.images, inception, batch_size=args.batch_size, device=device)
    write_fid_stats(out, mu, sigma)
    logger.info("wrote FID statistics of %s (%d-d) to %s", args.images, mu.shape[0], out)
    sys.stdout.write(f"{out}\n")
    return 0
