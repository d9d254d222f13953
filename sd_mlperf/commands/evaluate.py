"""`sd-mlperf evaluate --checkpoint PATH...`: FID and CLIP of saved UNet checkpoints (offline evaluation).

The MLPerf rules allow evaluating saved checkpoints after training. For each checkpoint (a trainer
`step_XXXXXXX/` directory, its `model.pt`, or an ldm export such as `unet_ldm.safetensors`) this
loads the UNet, runs the same evaluator as inline evaluation (all prompts, split over the launched
processes), writes the PNG grid and JSON under `RUN_DIR/eval_offline/`, prints one line, and appends
eval_start / eval_accuracy (FID, CLIP) / eval_stop with the checkpoint's samples_count to the MLPerf
log of the run the checkpoint belongs to (rank 0 only).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from sd_mlperf.commands._common import add_config_arguments

NAME = "evaluate"
HELP = "evaluate saved checkpoints (FID, CLIP); writes a grid + JSON and appends MLPerf eval_* lines"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                        help="checkpoint directories (run/checkpoints/step_XXXXXXX), model.pt files or ldm UNet "
                             "exports (.safetensors/.ckpt), evaluated in order")
    parser.add_argument("--num-prompts", type=int, metavar="N", help="evaluate only the first N prompts (quick look; "
                        "same as eval.num_prompts=N; the MLPerf target needs all 30,000)")
    parser.add_argument("--samples-count", type=int, metavar="N",
                        help="samples_count for the MLPerf lines when the checkpoint does not record it (ldm exports)")
    parser.add_argument("--mlperf-log", metavar="FILE", help="MLPerf log to append to (default: RUN_DIR/"
                        "logging.mlperf_log_file, RUN_DIR being the checkpoint's run directory)")
    parser.add_argument("--no-mlperf-log", action="store_true", help="do not write MLPerf lines")
    add_config_arguments(parser)


def checkpoint_info(path: str | Path, samples_count: int | None = None) -> dict[str, Any]:
    """UNet state dict, step, samples_count and run directory (or None) of a checkpoint path."""
    from sd_mlperf.checkpoint import MODEL_FILE, load_file
    from sd_mlperf.models.checkpoint_io import load_unet_state_dict

    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{path} is a directory without {MODEL_FILE}; pass a trainer checkpoint "
                                    "directory (RUN_DIR/checkpoints/step_XXXXXXX) or a weights file")
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    step, count = None, samples_count
    if path.name == MODEL_FILE:
        payload = load_file(path)
        if not isinstance(payload, dict) or "unet" not in payload:
            raise ValueError(f"{path}: not a trainer checkpoint (no 'unet' entry); pass an ldm export instead")
        state, step = payload["unet"], int(payload.get("step", 0))
        count = int(payload["samples_count"]) if "samples_count" in payload else count
    else:
        state = load_unet_state_dict(path)
    match = _STEP_DIR.match(path.parent.name)
    if step is None and match:
        step = int(match.group(1))
    # RUN_DIR/checkpoints/step_X/file -> RUN_DIR
    run_dir = path.parents[2] if match and path.parent.parent.name == "checkpoints" else None
    return {"path": path, "state": state, "step": step or 0, "samples_count": count, "run_dir": run_dir}


def _append_mlperf(log_path: Path, samples_count: int, fid: float, clip: float) -> None:
    """Append one evaluation's eval_start / eval_accuracy (FID, CLIP) / eval_stop to a run's MLPerf log."""
    from sd_mlperf.mlperf_log import MLPerfLogger

    mlperf = MLPerfLogger(log_path, append=True)
    try:
        mlperf.eval_start(samples_count)
        mlperf.eval_result(samples_count, fid, clip)
        mlperf.eval_stop(samples_count)
    finally:
        mlperf.close()


def run(args: argparse.Namespace) -> int:
    import torch

    from sd_mlperf.config import load_config
    from sd_mlperf.eval.evaluator import build_evaluator
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders, check_state_dict
    from sd_mlperf.models.unet import build_unet
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from sd_mlperf.utils.logging import logger, setup_logging

    # `--checkpoint A B key=value` hands the overrides to --checkpoint (nargs="+"): take back every entry
    # that looks like an override and is not an existing path (Lightning names such as epoch=1.ckpt exist).
    checkpoints = [c for c in args.checkpoint if "=" not in c or Path(c).exists()]
    overrides = [c for c in args.checkpoint if c not in checkpoints] + list(args.overrides)
    if not checkpoints:
        raise ValueError("--checkpoint needs at least one checkpoint path")
    if args.num_prompts is not None:
        if args.num_prompts < 2:
            raise ValueError(f"--num-prompts must be at least 2 (FID needs 2 images), got {args.num_prompts}")
        overrides.append(f"eval.num_prompts={args.num_prompts}")
    cfg = load_config(args.config, overrides)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    dist = init_distributed(cfg.run, cfg.parallel)
    setup_logging(cfg.logging.level, rank=dist.rank)
    try:
        default_run_dir = Path(cfg.run.output_dir) / cfg.run.name
        vae, text_encoder = build_frozen_encoders(cfg.model)  # random ones (smoke) are the trainer's too
        vae.to(dist.device).eval()
        text_encoder.to(dist.device).eval()
        unet = build_unet(cfg.model.unet).to(dist.device).eval()
        evaluator = build_evaluator(cfg, vae=vae, text_encoder=text_encoder, rank=dist.rank,
                                    world_size=dist.world_size, device=dist.device, run_dir=default_run_dir,
                                    out_subdir="eval_offline")
        for spec in checkpoints:
            info = checkpoint_info(spec, args.samples_count)
            check_state_dict(unet, info["state"], source=str(info["path"]))
            unet.load_state_dict(info["state"], strict=True)
            run_dir = info["run_dir"] or default_run_dir
            evaluator.out_dir = Path(run_dir) / "eval_offline"
            count = info["samples_count"]
            result = evaluator.evaluate(unet, samples_count=count or 0, step=info["step"])
            if dist.rank != 0:
                continue
            sys.stdout.write(f"{info['path']}: step {info['step']} samples {count} FID {result.fid:.4f} "
                             f"CLIP {result.clip:.4f} ({result.num_images} images, {result.seconds:.1f} s) "
                             f"-> {result.json_path}\n")
            if args.no_mlperf_log:
                continue
            if count is None:
                logger.warning("%s records no samples_count: no MLPerf lines written (pass --samples-count N)",
                               info["path"])
                continue
            log_path = Path(args.mlperf_log) if args.mlperf_log else Path(run_dir) / cfg.logging.mlperf_log_file
            _append_mlperf(log_path, count, result.fid, result.clip)
            logger.info("appended eval_* lines (samples_count %d) to %s", count, log_path)
    finally:
        destroy_distributed()
    return 0
