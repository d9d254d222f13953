"""`sd-mlperf evaluate`: FID and CLIP of saved checkpoints (offline evaluation, as the MLPerf rules allow).

Two forms:
- `--run-dir RUN` (the submission path): scores the checkpoints a run collected with eval.inline=false
  (RUN/eval_checkpoints/) as the rules require -- `--all` (every checkpoint up to the first passing one),
  `--last-two` (the first passing one and the one before it, by bisection) or `--watch` (as they land, then
  RUN/STOP tells the trainer to stop) -- and writes the run's final MLPerf log (RUN/mlperf.log): the training
  log, the scores, and run_stop at the time the first passing checkpoint was collected (sd_mlperf.training.final_log).
  The run's own config.yaml is the config (its seed gives the evaluation noise); overrides may follow.
- `--checkpoint PATH` (repeatable): any trainer checkpoint directory, its model.pt or an ldm export (.safetensors
  /.ckpt); prints FID and CLIP. With `--mlperf-log FILE` it appends eval_* lines there.

Both run the inline evaluator (all prompts split over the launched processes) and write the PNG grid and JSON
under RUN/eval_offline/.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from sd_mlperf.commands._common import add_config_arguments

NAME = "evaluate"
HELP = "score saved checkpoints (FID, CLIP); --run-dir writes a run's final MLPerf log"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run-dir", metavar="RUN", help="a run trained with eval.inline=false: score its collected "
                      "checkpoints as the rules require and write RUN/mlperf.log")
    what.add_argument("--checkpoint", action="append", metavar="PATH",
                      help="a checkpoint directory (RUN/checkpoints/step_XXXXXXX), its model.pt, or an ldm UNet export "
                           "(.safetensors/.ckpt); repeatable, evaluated in order")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--all", dest="strategy", action="store_const", const="all",
                     help="--run-dir: every collected checkpoint up to the first passing one (default)")
    how.add_argument("--last-two", dest="strategy", action="store_const", const="last_two",
                     help="--run-dir: the first passing checkpoint and the one before it, found by bisection (assumes "
                          "quality improves with training; the rules ask this of 9 of the 10 runs)")
    how.add_argument("--watch", dest="strategy", action="store_const", const="watch",
                     help="--run-dir: score checkpoints as the trainer collects them; once one passes, write RUN/STOP "
                          "(the trainer stops at its next checkpoint) and the final log")
    parser.set_defaults(strategy="all")
    parser.add_argument("--poll-s", type=float, default=30.0, metavar="S", help="--watch: seconds between looks")
    parser.add_argument("--watch-timeout-s", type=float, metavar="S",
                        help="--watch: give up after S seconds without a passing checkpoint or the end of training")
    parser.add_argument("--num-prompts", type=int, metavar="N", help="score only the first N prompts (a quick look; "
                        "never written to the final log: the MLPerf target needs all 30,000)")
    parser.add_argument("--samples-count", type=int, metavar="N",
                        help="--checkpoint: samples_count for --mlperf-log when the file does not record it")
    parser.add_argument("--mlperf-log", metavar="FILE", help="--checkpoint: append eval_* lines to FILE")
    add_config_arguments(parser)


def checkpoint_info(path: str | Path, samples_count: int | None = None) -> dict[str, Any]:
    """UNet state dict, step, samples_count and run directory (or None) of a checkpoint path."""
    from sd_mlperf.models.checkpoint_io import load_unet_state_dict
    from sd_mlperf.training.checkpoints import MODEL_FILE, load_file

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


def _scoring_parts(cfg: Any, dist: Any, out_dir: Path) -> tuple[Any, Any]:
    """(UNet, evaluator) on this rank's device; the frozen parts are the trainer's (same file or same seed)."""
    from sd_mlperf.eval.evaluator import build_evaluator
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders
    from sd_mlperf.models.unet import build_unet

    vae, text_encoder = build_frozen_encoders(cfg.model)
    vae.to(dist.device).eval()
    text_encoder.to(dist.device).eval()
    unet = build_unet(cfg.model.unet, compute_precisions={"eval.precision": cfg.eval.precision})
    unet.to(dist.device).eval()
    evaluator = build_evaluator(cfg, vae=vae, text_encoder=text_encoder, rank=dist.rank, world_size=dist.world_size,
                                device=dist.device, run_dir=out_dir.parent, out_subdir=out_dir.name)
    return unet, evaluator


def _check_num_prompts(n: int | None) -> None:
    if n is not None and n < 2:
        raise ValueError(f"--num-prompts must be at least 2 (FID needs 2 images), got {n}")


def _evaluate_run_dir(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from sd_mlperf.config import load_config
    from sd_mlperf.config.load import evaluation_seed
    from sd_mlperf.models.checkpoint_io import check_state_dict
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed, read_launch_env
    from sd_mlperf.training.offline_eval import RunEvaluation
    from sd_mlperf.utils.logging import setup_logging

    run_dir = Path(args.run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: --run-dir takes a run directory of `sd-mlperf train`")
    # The run's own config (seed, targets, evaluation settings); the processes are this launch's, not training's.
    world = read_launch_env().world_size
    cfg = load_config([config, *args.config], ["parallel.num_nodes=1", f"parallel.gpus_per_node={world}",
                                              *args.overrides])
    if cfg.eval.inline:
        raise ValueError(f"{run_dir} trained with eval.inline=true: its {cfg.logging.mlperf_log_file} is final "
                         "already. Use --checkpoint to score its checkpoints again.")
    _check_num_prompts(args.num_prompts)
    num_prompts = args.num_prompts or cfg.eval.num_prompts
    scoring_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_prompts=num_prompts))
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    dist = init_distributed(cfg.run, cfg.parallel)
    setup_logging(cfg.logging.level, rank=dist.rank)
    try:
        unet, evaluator = _scoring_parts(scoring_cfg, dist, run_dir / "eval_offline")

        def evaluate(payload: dict) -> tuple[float, float]:
            check_state_dict(unet, payload["unet"], source=f"{run_dir} step {payload['step']}")
            unet.load_state_dict(payload["unet"], strict=True)
            result = evaluator.evaluate(unet, samples_count=int(payload["samples_count"]), step=int(payload["step"]))
            return result.fid, result.clip

        runner = RunEvaluation(run_dir, evaluate=evaluate, num_prompts=num_prompts, noise_seed=evaluation_seed(cfg),
                               target_fid=cfg.training.target_fid, target_clip=cfg.training.target_clip,
                               is_main=dist.is_main, final_num_prompts=cfg.eval.num_prompts)
        if args.strategy == "watch":
            runner.watch(poll_s=args.poll_s, timeout_s=args.watch_timeout_s)
        else:
            records, _ = runner.collected()
            if not records:
                raise ValueError(f"{run_dir}/eval_checkpoints holds no collected checkpoint yet (the trainer collects "
                                 "one at every checkpoint_every_samples)")
            (runner.score_all if args.strategy == "all" else runner.score_last_two)(records)
        return _report(runner, run_dir / cfg.logging.mlperf_log_file, is_main=dist.is_main)
    finally:
        destroy_distributed()


def _report(runner: Any, log_path: Path, *, is_main: bool) -> int:
    """Write the final log if it can be written (every rank calls this); rank 0 prints. 0 = a valid converged run."""
    first = runner.first_passing()
    try:
        runner.write_final_log(log_path)  # collective: every rank, before any rank returns
        error = None
    except ValueError as exc:
        error = str(exc)
    lonely = first is not None and not any(s.samples_count < first.samples_count for s in runner.scores.values())
    if is_main:
        for score in sorted(runner.scores.values(), key=lambda s: s.step):
            sys.stdout.write(f"step {score.step} samples {score.samples_count}: FID {score.fid:.4f} "
                             f"CLIP {score.clip:.4f} {'PASS' if runner.passes(score) else 'fail'}\n")
        if error is not None:
            sys.stdout.write(f"no final log written: {error}\n")
        elif first is None:
            sys.stdout.write(f"not converged: {log_path} ends with run_stop (aborted)\n")
        else:
            sys.stdout.write(f"converged at {first.samples_count} samples (step {first.step}): {log_path} ends with "
                             "run_stop (success) at that checkpoint's collection time\n")
        if lonely:
            sys.stdout.write("error: the first collected checkpoint already passes, so the log holds one evaluation "
                             "and the compliance checker (which wants two) refuses it\n")
    return 0 if error is None and first is not None and not lonely else 1


def _append_mlperf(log_path: Path, samples_count: int, fid: float, clip: float) -> None:
    """Append one evaluation's eval_start / eval_accuracy (FID, CLIP) / eval_stop to an MLPerf log."""
    from sd_mlperf.training.mlperf_log import MLPerfLogger

    mlperf = MLPerfLogger(log_path, append=True)
    try:
        mlperf.eval_start(samples_count)
        mlperf.eval_result(samples_count, fid, clip)
        mlperf.eval_stop(samples_count)
    finally:
        mlperf.close()


def _seed_from_run(cfg: Any, infos: list[dict[str, Any]]) -> list[str]:
    """Overrides that give a null run.seed the value of the run the checkpoints come from (its config.yaml)."""
    from omegaconf import OmegaConf

    if cfg.run.seed is not None or cfg.eval.seed is not None:
        return []
    for info in infos:
        config = Path(info["run_dir"] or "/nonexistent") / "config.yaml"
        seed = OmegaConf.load(config).run.get("seed") if config.is_file() else None
        if seed is not None:
            return [f"run.seed={seed}"]
    return []


def _evaluate_checkpoints(args: argparse.Namespace) -> int:
    import torch

    from sd_mlperf.config import load_config
    from sd_mlperf.models.checkpoint_io import check_state_dict
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from sd_mlperf.utils.logging import logger, setup_logging

    _check_num_prompts(args.num_prompts)
    overrides = list(args.overrides) + ([f"eval.num_prompts={args.num_prompts}"] if args.num_prompts else [])
    cfg = load_config(args.config, overrides)
    infos = [checkpoint_info(spec, args.samples_count) for spec in args.checkpoint]
    seed = _seed_from_run(cfg, infos)
    if seed:
        cfg = load_config(args.config, [*overrides, *seed])
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    dist = init_distributed(cfg.run, cfg.parallel)
    setup_logging(cfg.logging.level, rank=dist.rank)
    try:
        default_run_dir = Path(cfg.run.output_dir) / cfg.run.name
        unet, evaluator = _scoring_parts(cfg, dist, default_run_dir / "eval_offline")
        for info in infos:
            check_state_dict(unet, info["state"], source=str(info["path"]))
            unet.load_state_dict(info["state"], strict=True)
            evaluator.out_dir = Path(info["run_dir"] or default_run_dir) / "eval_offline"
            count = info["samples_count"]
            result = evaluator.evaluate(unet, samples_count=count or 0, step=info["step"])
            if dist.rank != 0:
                continue
            sys.stdout.write(f"{info['path']}: step {info['step']} samples {count} FID {result.fid:.4f} "
                             f"CLIP {result.clip:.4f} ({result.num_images} images, {result.seconds:.1f} s) "
                             f"-> {result.json_path}\n")
            if args.mlperf_log and count is None:
                logger.warning("%s records no samples_count: no MLPerf lines written (pass --samples-count N)",
                               info["path"])
            elif args.mlperf_log:
                _append_mlperf(Path(args.mlperf_log), count, result.fid, result.clip)
                logger.info("appended eval_* lines (samples_count %d) to %s", count, args.mlperf_log)
    finally:
        destroy_distributed()
    return 0


def run(args: argparse.Namespace) -> int:
    return _evaluate_run_dir(args) if args.run_dir else _evaluate_checkpoints(args)

