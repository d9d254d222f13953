"""`sd-mlperf`: one console script, one module per subcommand in `sd_mlperf/commands/`.

Each command module defines NAME, HELP, add_arguments(parser) and run(args) -> exit code, and
keeps heavy imports inside run() so `sd-mlperf --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import sd_mlperf.commands as commands_pkg
from sd_mlperf.config import ConfigError
from sd_mlperf.utils.logging import logger, setup_logging


def _command_modules() -> list:
    names = sorted(m.name for m in pkgutil.iter_modules(commands_pkg.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"sd_mlperf.commands.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="sd-mlperf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    # Overrides may follow options (`inspect unet --config f a.b=1`); argparse leaves those unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        logger.error("config error: %s", exc)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
