"""`sd-mlperf train`: train the UNet as configured (MLPerf log, checkpoints and metrics in the run directory)."""

from __future__ import annotations

import argparse
import time

from sd_mlperf.commands._common import add_config_arguments

NAME = "train"
HELP = "train the UNet (run it under torchrun or srun for several processes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config files and KEY=VALUE overrides, like every subcommand."""
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Train; exit status 0 when the run ended normally (quality target reached or not)."""
    init_time_ms = int(time.time() * 1e3)  # before the heavy imports: MLPerf init time starts here
    from sd_mlperf.train import main

    main(args.config, args.overrides, init_time_ms=init_time_ms)
    return 0
