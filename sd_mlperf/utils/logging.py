"""The package logger: rank 0 by default, warn-once for repeats, nothing at import time.

The caller says which rank this process is (the CLI from the launch environment before any command runs,
train/evaluate from their DistInfo after init); this module reads no environment.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

LOGGER_NAME = "sd_mlperf"
logger = logging.getLogger(LOGGER_NAME)
_seen_once: set[str] = set()


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (pytest and tqdm swap it out)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def setup_logging(level: str | int = "INFO", *, rank: int = 0, all_ranks: bool = False) -> None:
    """Attach one stderr handler to the package logger; ranks other than 0 log warnings only (unless all_ranks)."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    logger.setLevel(level if (rank == 0 or all_ranks) else logging.WARNING)
    where = f" rank{rank}" if all_ranks else ""
    fmt = f"[%(asctime)s{where} %(levelname)s] %(message)s"
    handler = next((h for h in logger.handlers if getattr(h, "_sd_mlperf", False)), None)
    if handler is None:
        handler = _CurrentStderrHandler()
        handler._sd_mlperf = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logger.propagate = False


def log_once(key: str, message: str, level: int = logging.WARNING) -> bool:
    """Log `message` the first time `key` is seen in this process; return whether it was logged."""
    if key in _seen_once:
        return False
    _seen_once.add(key)
    logger.log(level, message)
    return True


def reset_log_once() -> None:
    """Forget which keys were logged (tests use this)."""
    _seen_once.clear()


def show_progress_bar(mode: str, stream: IO[str] | None = None) -> bool:
    """The `logging.progress_bar` rule: `on`, `off`, or `auto` = only when the stream is a terminal."""
    return mode == "on" or (mode == "auto" and (stream or sys.stderr).isatty())
