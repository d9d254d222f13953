"""Where this process sits in the launch, read from the launcher's environment: no torch, no process group.

The CLI reads it before any command runs (to log INFO on rank 0 only); parallel.distributed builds the
process group and the DistInfo from it. Launchers are recognised by their environment variables:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR defaults to the first host of
  SLURM_JOB_NODELIST and MASTER_PORT to 29500 (plus SLURM_JOB_ID mod 1000, so jobs sharing a node do
  not collide). Where node names do not resolve, slurm/srun.sh exports MASTER_ADDR (the first node's
  Slurm NodeAddr, or --master-addr).
- neither: one process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout read from the launcher's environment variables."""

    launcher: Literal["torchrun", "slurm", "none"]
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list (`node[01-04,07]`, `a1,b[1-2]-ib`) into host names, in order."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.split(r",(?![^\[]*\])", nodelist.strip()):
        if item:
            hosts.extend(_expand_host(item))
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host; set MASTER_ADDR explicitly.")
    return hosts


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    out: list[str] = []
    for part in match.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {part!r} in Slurm host list {pattern!r}; set MASTER_ADDR explicitly.")
            width = len(lo)  # Slurm keeps the zero padding of the lower bound
            names = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            names = [part]
        for name in names:
            out.extend(_expand_host(head + name + tail))  # later bracket groups
    return out


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size, local rank and the rendezvous address from torchrun or Slurm variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return LaunchEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                         env.get("MASTER_ADDR"), int(port) if port else None)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if addr is None and nodelist:
            addr = expand_nodelist(nodelist)[0]
        port = env.get("MASTER_PORT")
        if port is None:
            port = str(DEFAULT_MASTER_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", "0")), addr, int(port))
    return LaunchEnv("none", 0, 1, 0, None, None)
