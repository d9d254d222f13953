"""Shared pieces of the tests that spawn several gloo processes on this machine."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_torchrun_env(rank: int, world_size: int, port: int) -> None:
    """Set the variables torchrun would give `rank` of `world_size` processes on localhost."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
