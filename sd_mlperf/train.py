"""Training entry point: logging, config, distributed init, build, fit; always closes writers and groups.

Run it as `sd-mlperf train --config conf/smoke.yaml` (one process) or under torchrun / srun with the
benchmark configs; see README.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from sd_mlperf.config import load_config
from sd_mlperf.fastpath.runtime import configure_device
from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
from sd_mlperf.report.summary import log_run_summary
from sd_mlperf.trainer import Trainer, TrainState
from sd_mlperf.trainer_build import build_trainer
from sd_mlperf.utils.logging import setup_logging


def main(config_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = (), *,
         init_time_ms: int | None = None) -> TrainState:
    """Train as configured; `init_time_ms` (process start) becomes the MLPerf init_start time."""
    init_time_ms = init_time_ms or int(time.time() * 1e3)
    cfg = load_config(config_files, overrides)
    if cfg.run.num_threads is not None:  # validated positive by load_config
        torch.set_num_threads(cfg.run.num_threads)
    dist = init_distributed(cfg.run, cfg.parallel)
    setup_logging(cfg.logging.level, rank=dist.rank)
    configure_device(dist.device)  # cuDNN autotuning, as `sd-mlperf bench train` times the step
    trainer: Trainer | None = None
    try:
        trainer = build_trainer(cfg, dist, init_time_ms=init_time_ms)
        state = trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
    if dist.is_main:  # after close(): the summary reads the run's files back
        log_run_summary(trainer.run_dir, cfg)
    return state
