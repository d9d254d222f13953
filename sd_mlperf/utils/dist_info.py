"""Which rank and device this process is: built once (parallel.distributed.init_distributed) and passed down.

Lower layers (data, eval, logging) take a DistInfo, or its rank, as an argument instead of reading the
environment or asking torch.distributed themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world, its device and the collective backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Literal["nccl", "gloo", "none"]

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs and writes files)."""
        return self.rank == 0
