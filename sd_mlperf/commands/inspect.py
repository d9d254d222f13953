"""`sd-mlperf inspect MODEL`: build a model on the meta device, print its size, write its key manifest."""

from __future__ import annotations

import argparse
import importlib
import sys

from sd_mlperf.commands._common import add_config_arguments

NAME = "inspect"
HELP = "build a model on the meta device; print its parameter count and optionally its key manifest (TSV)"

# model name -> (module, builder, config section the builder takes or None for no argument).
MODELS = {
    "unet": ("sd_mlperf.models.unet", "build_unet", "model.unet"),
    "vae": ("sd_mlperf.models.vae", "build_vae", "model.vae"),
    "text-encoder": ("sd_mlperf.models.text_encoder", "build_text_encoder", "model.text_encoder"),
    "inception": ("sd_mlperf.eval.inception", "build_fid_inception", None),
    "clip": ("sd_mlperf.eval.clip_score", "build_clip", None),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(MODELS), help="which model to build")
    parser.add_argument("--keys", metavar="FILE", help="write the state-dict names/shapes/dtypes here as TSV")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch
    from omegaconf import OmegaConf

    from sd_mlperf.config import merge_config, validate
    from sd_mlperf.utils.logging import logger
    from sd_mlperf.utils.manifest import count_parameters, state_dict_manifest, write_manifest

    merged = merge_config(args.config, args.overrides)
    validate(merged)
    # Builders take their own section (paths elsewhere may stay unset).
    module_name, builder_name, section = MODELS[args.model]
    builder = getattr(importlib.import_module(module_name), builder_name)
    with torch.device("meta"):
        model = builder(OmegaConf.to_object(OmegaConf.select(merged, section))) if section else builder()
    n = count_parameters(model)
    sys.stdout.write(f"{args.model}: {n:,} parameters, {len(model.state_dict())} tensors\n")
    if args.keys:
        write_manifest(args.keys, state_dict_manifest(model))
        logger.info("wrote key manifest to %s", args.keys)
    return 0
