"""`sd-mlperf evaluate`: FID and CLIP of saved checkpoints (offline evaluation, as the MLPerf rules allow).

Two forms:
- `--run-dir RUN` (the submission path; one evaluator per run directory, RUN/eval_offline/evaluate.lock): scores
  the checkpoints a run collected with eval.inline=false (RUN/eval_checkpoints/) as the rules require -- `--all`
  (every checkpoint up to the first passing one), `--last-two` (the first passing one and the one before it, by
  bisection) or `--watch` (as they land, then RUN/STOP tells the trainer to stop) -- and writes the run's final
  MLPerf log (RUN/mlperf.log): the training log, the scores, and run_stop at the time the first passing checkpoint
  was collected (sd_mlperf.training.final_log). The run's own config.yaml is the config (its seed gives the
  evaluation noise); overrides may follow.
- `--checkpoint PATH` (repeatable): any trainer checkpoint directory, its model.pt, a collected
  RUN/eval_checkpoints/step_XXXXXXX.pt or an ldm export (.safetensors/.ckpt); prints FID and CLIP. With
  `--mlperf-log FILE` it appends eval_* lines there.

Both run the inline evaluator (all prompts split over the launched processes) and write the PNG grid and JSON
under RUN/eval_offline/. The command parses arguments; sd_mlperf.training.offline_eval does the work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sd_mlperf.commands._common import add_config_arguments

if TYPE_CHECKING:
    from sd_mlperf.config.schema import Config
    from sd_mlperf.utils.dist_info import DistInfo

NAME = "evaluate"
HELP = "score saved checkpoints (FID, CLIP); --run-dir writes a run's final MLPerf log"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """What to score (--run-dir or --checkpoint), how, and --config files with KEY=VALUE overrides."""
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
                          "(the trainer stops at its next checkpoint) and the final log. Waits for a trainer that has "
                          "not started yet; exits 1 when the trainer dies without recording its end")
    parser.set_defaults(strategy="all")
    parser.add_argument("--poll-s", type=float, default=30.0, metavar="S", help="--watch: seconds between looks")
    parser.add_argument("--watch-timeout-s", type=float, metavar="S",
                        help="--watch: give up (exit 1) after S seconds without a passing checkpoint or the end of "
                             "training")
    parser.add_argument("--num-prompts", type=int, metavar="N", help="score only the first N prompts (a quick look; "
                        "never written to the final log: the MLPerf target needs all 30,000)")
    parser.add_argument("--samples-count", type=int, metavar="N",
                        help="--checkpoint: samples_count for --mlperf-log when the file does not record it")
    parser.add_argument("--mlperf-log", metavar="FILE", help="--checkpoint: append eval_* lines to FILE")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Score the checkpoints; 0 = done (--run-dir: a valid converged run with its final log written)."""
    import torch

    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from sd_mlperf.training.eval_config import load_checkpoint_config, load_run_config, wait_for_run_config
    from sd_mlperf.training.smoke_assets import prepare_smoke_assets
    from sd_mlperf.utils.logging import setup_logging

    checkpoints: list[Path] = []
    if args.run_dir:
        if args.strategy == "watch":  # started before the trainer wrote its config: wait for it
            wait_for_run_config(args.run_dir, poll_s=args.poll_s, timeout_s=args.watch_timeout_s)
        cfg = load_run_config(args.run_dir, args.config, args.overrides, num_prompts=args.num_prompts)
    else:
        cfg, checkpoints = load_checkpoint_config(args.checkpoint, args.config, args.overrides,
                                                  num_prompts=args.num_prompts)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    dist = init_distributed(cfg.run, cfg.parallel)
    setup_logging(cfg.logging.level, rank=dist.rank)
    try:
        prepare_smoke_assets(cfg, dist, for_training=False)  # smoke configs only: pictures and FID statistics
        if args.run_dir:
            return _score_run(args, cfg, dist)
        return _score_checkpoints(args, cfg, dist, checkpoints)
    finally:
        destroy_distributed()


def _score_run(args: argparse.Namespace, cfg: Config, dist: DistInfo) -> int:
    from sd_mlperf.training.checkpoint_scorer import build_checkpoint_scorer
    from sd_mlperf.training.offline_eval import offline_eval_dir, open_run_evaluation, prepare_run_evaluation

    run_dir = Path(args.run_dir)
    # Before any model is built or prompt scored: writable, and no other evaluator on this run directory.
    lock = prepare_run_evaluation(run_dir, cfg.logging.mlperf_log_file, is_main=dist.is_main)
    try:
        scorer = build_checkpoint_scorer(cfg, dist, offline_eval_dir(run_dir), num_prompts=args.num_prompts)
        runner = open_run_evaluation(run_dir, cfg, scorer, is_main=dist.is_main, num_prompts=args.num_prompts)
        runner.run(args.strategy, poll_s=args.poll_s, timeout_s=args.watch_timeout_s)
        outcome = runner.conclude(run_dir / cfg.logging.mlperf_log_file)
    finally:
        if lock is not None:
            lock.release()
    if dist.is_main:
        sys.stdout.write(outcome.summary())
    return outcome.exit_code


def _score_checkpoints(args: argparse.Namespace, cfg: Config, dist: DistInfo, checkpoints: list[Path]) -> int:
    from sd_mlperf.training.checkpoint_scorer import (
        append_checkpoint_score,
        build_checkpoint_scorer,
        describe_checkpoint_score,
    )
    from sd_mlperf.training.checkpoints import read_checkpoint_weights

    scorer = build_checkpoint_scorer(cfg, dist)
    for path in checkpoints:
        checkpoint = read_checkpoint_weights(path, args.samples_count)  # one checkpoint's weights in memory at a time
        result = scorer.score_checkpoint(checkpoint)
        if dist.is_main:
            sys.stdout.write(describe_checkpoint_score(checkpoint, result) + "\n")
            if args.mlperf_log:
                append_checkpoint_score(args.mlperf_log, checkpoint, result)
    return 0
