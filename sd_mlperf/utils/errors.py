"""The error a user fixes outside the config: raised on purpose, printed by the CLI on one line.

What the CLI prints on one line (sd_mlperf/cli.py): ConfigError (exit 2); ValueError (a configuration or
argument value), FileNotFoundError (a missing input) and UserError (the environment: a device, a library,
a rendezvous host, unreadable data) exit 1. Anything else, including a plain RuntimeError (CUDA, NCCL,
out of memory, a bug of ours), keeps its traceback.
"""

from __future__ import annotations


class UserError(RuntimeError):
    """The environment lacks what the run needs (a device, a library, a host, readable data); the message says the fix.

    A RuntimeError, as STYLE.md asks for environment errors, so `except RuntimeError` still catches it; unlike a
    plain RuntimeError the CLI prints it without a traceback.
    """
