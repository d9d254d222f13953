"""`sd-mlperf config`: print the resolved config for the given files and overrides."""

from __future__ import annotations

import argparse
import sys

from sd_mlperf.commands._common import add_config_arguments

NAME = "config"
HELP = "print the resolved config (schema defaults < --config files < overrides) and validate it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config files and KEY=VALUE overrides, plus --strict."""
    add_config_arguments(parser)
    parser.add_argument("--strict", action="store_true", help="also fail if a required key (???) is unset")


def run(args: argparse.Namespace) -> int:
    """Print the merged config as YAML after validating it; warn about (or with --strict refuse) unset keys."""
    from sd_mlperf.config import load_config, merge_config, validate
    from sd_mlperf.config.load import config_to_yaml, missing_keys
    from sd_mlperf.utils.logging import logger

    merged = merge_config(args.config, args.overrides)
    validate(merged)
    if args.strict:
        load_config(args.config, args.overrides)
    sys.stdout.write(config_to_yaml(merged))
    missing = missing_keys(merged)
    if missing:
        logger.warning("required keys still unset (???): %s", ", ".join(missing))
    return 0
