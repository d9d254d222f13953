"""`sd-mlperf make-synthetic-data --out DIR`: the embedded default dataset in the real formats."""

from __future__ import annotations

import argparse
import sys

from sd_mlperf.commands._common import add_config_arguments

NAME = "make-synthetic-data"
HELP = ("write LAION-style raw shards (KEY.jpg/.txt/.json) of captioned synthetic pictures, a val2014_30k.tsv "
        "and its reference images; sizes from data.synthetic.*")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (raw/, val2014_30k.tsv, val_images/)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from sd_mlperf.config import merge_config, validate
    from sd_mlperf.data.synthetic import make_synthetic_dataset

    merged = merge_config(args.config, args.overrides)
    validate(merged)
    paths = make_synthetic_dataset(args.out, OmegaConf.to_object(merged.data.synthetic))
    sys.stdout.write(f"raw shards: {len(paths.raw_shards)} in {paths.raw_shards[0].parent}\n"
                     f"prompts: {paths.prompts_file}\nreference images: {paths.val_images_dir}\n")
    return 0
