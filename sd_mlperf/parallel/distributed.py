"""Process groups and per-rank seeding: torchrun or Slurm launch, nccl on GPUs, gloo on CPUs.

Launchers are recognised by their environment variables:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR defaults to the first host of
  SLURM_JOB_NODELIST and MASTER_PORT to 29500 (plus SLURM_JOB_ID mod 1000, so jobs sharing a node do
  not collide). Where node names do not resolve, slurm/srun.sh exports MASTER_ADDR (the first node's
  Slurm NodeAddr, or --master-addr); an address that does not resolve fails at once, not at the timeout.
- neither: one process, no process group.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sd_mlperf.config.schema import ParallelConfig, RunConfig
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.logging import logger
from sd_mlperf.utils.seeds import derive_seed

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


def check_resolves(master_addr: str) -> None:
    """Fail at once when the rendezvous host does not resolve here; the other ranks would retry until the timeout."""
    try:
        socket.getaddrinfo(master_addr, None)
    except socket.gaierror as exc:
        raise RuntimeError(
            f"the rendezvous host {master_addr!r} (MASTER_ADDR, else the first host of SLURM_JOB_NODELIST) does not "
            f"resolve on {socket.gethostname()} ({exc.strerror}); export MASTER_ADDR=<rank 0's IP address> "
            "(slurm/srun.sh takes it from the node's Slurm NodeAddr, or from --master-addr)") from exc


def _pick_device(run: RunConfig, local_rank: int) -> torch.device:
    if run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but torch sees no CUDA device; check the driver and "
                               "CUDA_VISIBLE_DEVICES, or set run.device=cpu.")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                               "launch at most one process per GPU.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: RunConfig, parallel: ParallelConfig) -> DistInfo:
    """Create the process group (if launched with several processes) and return this rank's DistInfo."""
    launch = read_launch_env()
    expected = parallel.num_nodes * parallel.gpus_per_node
    if launch.world_size != expected:
        raise ValueError(
            f"the launcher ({launch.launcher}) started {launch.world_size} process(es) but "
            f"parallel.num_nodes x parallel.gpus_per_node = {parallel.num_nodes} x {parallel.gpus_per_node} = "
            f"{expected}; launch {expected} processes (torchrun --nproc-per-node / srun --ntasks) or set "
            "parallel.num_nodes and parallel.gpus_per_node to match."
        )
    device = _pick_device(cfg, launch.local_rank)
    if launch.world_size == 1:
        logger.info("distributed: single process on %s, no process group", device)
        return DistInfo(0, 1, 0, device, "none")
    if launch.master_addr is None:
        raise RuntimeError(f"{launch.launcher} launch without MASTER_ADDR; export MASTER_ADDR (the host of rank 0).")
    check_resolves(launch.master_addr)
    # env:// rendezvous reads these; Slurm does not set them.
    os.environ.update({"RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size),
                       "LOCAL_RANK": str(launch.local_rank), "MASTER_ADDR": launch.master_addr,
                       "MASTER_PORT": str(launch.master_port or DEFAULT_MASTER_PORT)})
    backend: Literal["nccl", "gloo"] = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend=backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
        timeout=datetime.timedelta(seconds=parallel.timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    logger.info("distributed: %s, %d processes (%d nodes x %d), %s, master %s:%s", launch.launcher,
                launch.world_size, parallel.num_nodes, parallel.gpus_per_node, backend,
                launch.master_addr, os.environ["MASTER_PORT"])
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device, backend)


def configure_device(device: torch.device) -> None:
    """cuDNN autotuning on: training shapes are static, so the one-time search pays off every step.

    TF32 stays as PyTorch defaults it: the benchmark trains in fp16, and an fp32 run is the
    numerics reference, which TF32 would blur.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    logger.info("cuda: cudnn.benchmark on (static shapes)")


def destroy_distributed() -> None:
    """Tear down megatron-core model-parallel state (if it was set up) and the process group."""
    import sys

    parallel_state = sys.modules.get("megatron.core.parallel_state")  # only if the mcore backend ran
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


MAX_SEED = 2**32 - 1
"""Drawn seeds are in [0, MAX_SEED], as the MLPerf reference draws them."""


def draw_seed() -> int:
    """A seed from the OS entropy source (MLPerf rules, "Random numbers": clock, OS entropy, or an RNG seeded so)."""
    return random.SystemRandom().randint(0, MAX_SEED)


def agree_on_seed(seed: int | None, dist: DistInfo) -> int:
    """The run seed of every rank: `seed` if given, else rank 0's draw from the OS, broadcast to all."""
    if seed is not None:
        return int(seed)
    drawn = draw_seed() if dist.rank == 0 else 0
    if dist.world_size > 1:
        box = torch.tensor([drawn], dtype=torch.int64, device=dist.device)
        torch.distributed.broadcast(box, src=0)
        drawn = int(box.item())
    logger.info("run.seed is null: drew seed %d from the OS entropy source", drawn)
    return drawn


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for `rank` derived from the run seed (independent streams, not seed + rank)."""
    return derive_seed(seed, rank)


def seed_everything(seed: int, rank: int) -> torch.Generator:
    """Seed python, numpy and torch (CPU and CUDA) for this rank; return a torch.Generator seeded alike."""
    derived = rank_seed(seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)  # numpy's legacy seed takes 32 bits
    torch.manual_seed(derived)  # also seeds every CUDA device
    gen = torch.Generator()
    gen.manual_seed(derived)
    return gen
