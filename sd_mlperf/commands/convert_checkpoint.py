"""`sd-mlperf convert-checkpoint`: write safetensors for fast, code-free loading.

Two modes:
- `--input 512-base-ema.ckpt --output frozen.safetensors`: keep only the frozen parts (VAE and
  text tower) under their ldm prefixes, so `load_frozen_encoders` reads the output directly.
- `--unet OUR_CKPT --output unet.safetensors`: our UNet weights (a trainer checkpoint with a
  `unet` entry, or a plain state dict) under `model.diffusion_model.*` names.
"""

from __future__ import annotations

import argparse
import sys

NAME = "convert-checkpoint"
HELP = "convert 512-base-ema.ckpt (frozen parts) or our UNet checkpoint to safetensors with ldm names"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="CKPT", help="ldm checkpoint (512-base-ema.ckpt): keep VAE + text tower")
    source.add_argument("--unet", metavar="CKPT", help="our UNet checkpoint (or a state dict): export ldm names")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .safetensors file to write")
    parser.add_argument("--sha256", metavar="HEX", help="verify the input's sha256 before converting")


def run(args: argparse.Namespace) -> int:
    from sd_mlperf.models import checkpoint_io as io
    from sd_mlperf.utils.logging import logger

    if not args.output.endswith(".safetensors"):
        raise ValueError(f"--output {args.output}: the output must be a .safetensors file")
    source = args.input or args.unet
    if args.sha256:
        io.verify_sha256(source, args.sha256)
    if args.input:
        state = io.safe_load_state_dict(args.input)
        keep = {k: v for k, v in state.items() if k.startswith((io.VAE_PREFIX, io.TEXT_PREFIX))}
        num_vae = sum(k.startswith(io.VAE_PREFIX) for k in keep)
        if not num_vae or num_vae == len(keep):
            raise ValueError(f"{args.input}: found {num_vae} '{io.VAE_PREFIX}*' and {len(keep) - num_vae} "
                             f"'{io.TEXT_PREFIX}*' tensors; both parts are needed. Is this an SD2 ldm checkpoint?")
        io.save_safetensors(keep, args.output, metadata={"format": "pt", "source": str(args.input)})
        summary = f"{len(keep)} frozen tensors ({num_vae} VAE, {len(keep) - num_vae} text); " \
                  f"{len(state) - len(keep)} others dropped"
    else:
        unet_state = io.load_unet_state_dict(args.unet)
        if not unet_state:
            raise ValueError(f"{args.unet}: no tensors found (expected a 'unet' entry or a UNet state dict)")
        io.export_unet_ldm(unet_state, args.output)
        summary = f"{len(unet_state)} UNet tensors as {io.UNET_PREFIX}*"
    logger.info("wrote %s", args.output)
    sys.stdout.write(f"{args.output}: {summary}\n")
    return 0
