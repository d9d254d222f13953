"""Process groups, the device rule and per-rank seeding: torchrun or Slurm launch, nccl on GPUs, gloo on CPUs.

Which rank a process is comes from the launcher's environment (`read_launch_env`, sd_mlperf.parallel.launch);
which device it uses comes from `pick_device`, the one device rule. `init_distributed` puts both
into the DistInfo that the rest of the run receives; `launch_dist_info` does the same without a process
group, for commands whose ranks work independently (precompute-latents). An address that does not
resolve fails at once, not at the rendezvous timeout.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sd_mlperf.config.schema import ParallelConfig, RunConfig
from sd_mlperf.parallel.launch import DEFAULT_MASTER_PORT, read_launch_env
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger
from sd_mlperf.utils.seeds import derive_seed


def check_resolves(master_addr: str) -> None:
    """Fail at once when the rendezvous host does not resolve here; the other ranks would retry until the timeout."""
    try:
        socket.getaddrinfo(master_addr, None)
    except socket.gaierror as exc:
        raise UserError(
            f"the rendezvous host {master_addr!r} (MASTER_ADDR, else the first host of SLURM_JOB_NODELIST) does not "
            f"resolve on {socket.gethostname()} ({exc.strerror}); export MASTER_ADDR=<rank 0's IP address> "
            "(slurm/srun.sh takes it from the node's Slurm NodeAddr, or from --master-addr)") from exc


def pick_device(device_pref: str, local_rank: int = 0) -> torch.device:
    """The device rule (run.device): `cpu`; `cuda` (an error without one); `auto` = CUDA when present, else CPU.

    On CUDA the process takes GPU `local_rank` (one process per GPU) and makes it the current device.
    """
    if device_pref not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device_pref!r}: expected auto, cuda or cpu (run.device)")
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device=cuda but torch sees no CUDA device; check the driver and "
                        "CUDA_VISIBLE_DEVICES, or set run.device=cpu.")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                        "launch at most one process per GPU.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def launch_dist_info(device_pref: str, env: Mapping[str, str] | None = None) -> DistInfo:
    """This process's rank, world and device from the launch environment, with no process group (backend `none`).

    For commands whose ranks work independently and never talk to each other (precompute-latents splits its
    input shards by rank); training and evaluation use `init_distributed`.
    """
    launch = read_launch_env(env)
    return DistInfo(launch.rank, launch.world_size, launch.local_rank,
                    pick_device(device_pref, launch.local_rank), "none")


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
    device = pick_device(cfg.device, launch.local_rank)
    if launch.world_size == 1:
        logger.info("distributed: single process on %s, no process group", device)
        return DistInfo(0, 1, 0, device, "none")
    if launch.master_addr is None:
        raise UserError(f"{launch.launcher} launch without MASTER_ADDR; export MASTER_ADDR (the host of rank 0).")
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


def agree_on_resume(resume_from: Path | None, dist: DistInfo) -> Path | None:
    """Every rank's checkpoint to resume must be the same: each chose by reading the files itself, so a file that
    one rank cannot read or verify (a node-local fault) would split the run. Refuse that, naming every choice."""
    if dist.world_size <= 1:
        return resume_from
    chosen: list[str | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(chosen, None if resume_from is None else str(resume_from))
    if len(set(chosen)) > 1:
        by_rank = ", ".join(f"rank {r}: {c or 'none (fresh start)'}" for r, c in enumerate(chosen))
        raise UserError(f"the ranks chose different checkpoints to resume ({by_rank}): a checkpoint file that some "
                        "rank could not read or verify (see that rank's warnings). Repair or delete it, or set "
                        "training.resume to one checkpoint path (or never).")
    return resume_from


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
