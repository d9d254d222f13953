"""`sd-mlperf`: one console script, one module per subcommand in `sd_mlperf/commands/`.

Each command module defines NAME, HELP, add_arguments(parser) and run(args) -> exit code, and
keeps heavy imports inside run() so `sd-mlperf --help` stays fast.

Errors: those we raise on purpose for the user to fix print one line: ConfigError exits 2; ValueError,
FileNotFoundError and UserError (sd_mlperf.utils.errors; BackendUnavailable, BadDataError, ...) exit 1.
Any other exception (CUDA, NCCL, out of memory, a bug) leaves main() with its traceback; Python exits 1. Ctrl-C
prints one line and exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import sd_mlperf.commands as commands_pkg
from sd_mlperf.config import ConfigError
from sd_mlperf.parallel.launch import read_launch_env
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger, setup_logging

DESCRIPTION = """\
Train the Stable Diffusion v2 UNet exactly as the MLPerf Training benchmark defines it (v-objective, random
init, frozen VAE and OpenCLIP text encoder, until FID <= 90 and CLIP >= 0.15 on 30,000 COCO prompts), score
its checkpoints, and package ten timed runs as an MLPerf submission. Every fast GPU path has a plain-PyTorch
twin, so everything also runs on a CPU."""

EPILOG = """\
start here:
  sd-mlperf train --config conf/smoke.yaml        tiny models + synthetic data, under a minute on a CPU
  sd-mlperf backends                              which fast paths run on this machine, and why
  sd-mlperf config --config conf/sd2_mlperf.yaml  the resolved benchmark config
  torchrun --nproc-per-node 8 -m sd_mlperf train --config conf/sd2_mlperf.yaml --config conf/system/01x08x08.yaml

`sd-mlperf COMMAND --help` lists a command's flags; config values are overridden as dotted KEY=VALUE
arguments (training.max_steps=10). Docs by task: README.md and docs/ in the source tree."""


def package_version() -> str:
    """The installed distribution's version; the package's own `__version__` when run from an uninstalled tree."""
    from importlib import metadata

    try:
        return metadata.version("sd_mlperf")
    except metadata.PackageNotFoundError:
        from sd_mlperf import __version__

        return __version__


class _VersionAction(argparse.Action):
    """`--version`: looks the version up only when asked (the metadata scan costs more than parsing)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stdout.write(f"{parser.prog} {package_version()}\n")  # stdout, as argparse's own version action
        parser.exit()


def _command_modules() -> list:
    names = sorted(m.name for m in pkgutil.iter_modules(commands_pkg.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"sd_mlperf.commands.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="sd-mlperf", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction, help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line as the console script does; a bad line exits 2 with argparse's message (SystemExit)."""
    parser = build_parser() if parser is None else parser
    # Overrides may follow options (`inspect unet --config f a.b=1`); argparse leaves those unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = parse_args(argv)
    try:
        # Before any process group exists, the launcher's variables say the rank: on a multi-rank launch
        # only rank 0 logs INFO (train and evaluate set it again from their DistInfo after init).
        setup_logging(getattr(args, "log_level", "INFO"), rank=read_launch_env().rank)
        return int(args._run(args) or 0)
    except ConfigError as exc:
        logger.error("config error: %s", exc)
        return 2
    except (ValueError, FileNotFoundError, UserError) as exc:
        # Raised on purpose for the user to fix: one line. Anything else leaves with its traceback.
        logger.error("%s: %s", type(exc).__name__, exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was written says so (a training run records its end as interrupted)
        logger.error("interrupted (Ctrl-C)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
