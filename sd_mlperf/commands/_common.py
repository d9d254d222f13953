"""Arguments shared by subcommands: --config files and dotted overrides."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE` (repeatable, merged in order) and trailing `key=value` overrides."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config, merged in order over the schema defaults (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides applied last, e.g. training.max_steps=10")
