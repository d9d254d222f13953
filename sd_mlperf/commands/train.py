"""`sd-mlperf train`: train the UNet as configured (MLPerf log, checkpoints and metrics in the run directory).

`main` is the whole run: logging, config, distributed init, the smoke assets (synthetic-data configs only), build,
fit; it always closes writers and groups.
Run it as `sd-mlperf train --config conf/smoke.yaml` (one process) or under torchrun / srun with the benchmark
configs; see docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sd_mlperf.commands._common import add_config_arguments

if TYPE_CHECKING:
    from sd_mlperf.training.trainer import TrainState

NAME = "train"
HELP = "train the UNet (run it under torchrun or srun for several processes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config files and KEY=VALUE overrides, like every subcommand."""
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Train; exit status 0 when the run ended normally (quality target reached or not)."""
    init_time_ms = int(time.time() * 1e3)
    main(args.config, args.overrides, init_time_ms=init_time_ms)
    return 0


def main(config_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = (), *,
         init_time_ms: int | None = None) -> TrainState:
    """Train as configured; `init_time_ms` (process start) becomes the MLPerf init_start time."""
    # Imported here, after the clock started: `sd-mlperf --help` and the MLPerf init time stay unaffected by torch.
    import torch

    from sd_mlperf.config import load_config
    from sd_mlperf.parallel.distributed import configure_device, destroy_distributed, init_distributed
    from sd_mlperf.report.summary import log_run_summary
    from sd_mlperf.training.build import build_trainer
    from sd_mlperf.training.smoke_assets import prepare_smoke_assets
    from sd_mlperf.training.trainer import Trainer
    from sd_mlperf.utils.logging import setup_logging
    from sd_mlperf.utils.tensorboard import summary_writer_class

    init_time_ms = init_time_ms or int(time.time() * 1e3)
    cfg = load_config(config_files, overrides)
    if cfg.run.num_threads is not None:  # validated positive by load_config
        torch.set_num_threads(cfg.run.num_threads)
    dist = init_distributed(cfg.run, cfg.parallel)
    setup_logging(cfg.logging.level, rank=dist.rank)
    configure_device(dist.device)  # cuDNN autotuning, as `sd-mlperf bench train` times the step
    trainer: Trainer | None = None
    try:
        if cfg.logging.tensorboard:
            summary_writer_class()  # every rank, before any work: a missing `tensorboard` package fails here
        prepare_smoke_assets(cfg, dist)  # data.synthetic_dir: pictures, toy VAE, latents, FID statistics, once
        trainer = build_trainer(cfg, dist, init_time_ms=init_time_ms)
        state = trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
    if dist.is_main:  # after close(): the summary reads the run's files back
        log_run_summary(trainer.run_dir, cfg)
    return state
