"""Splitting prompts over ranks and gathering per-prompt results back in prompt order.

Prompts are cut into global batches of `batch_size` ([0, B), [B, 2B), ...) and rank r takes the
contiguous run of batches [r * nb // W, (r + 1) * nb // W), so every batch holds the same prompts
for any world size: per-image results are then bitwise the same for 1 or N processes, not only
equal up to rounding (kernels may round differently for another batch size). No prompt twice, none
left out, no padding prompt generated. Gathering pads each rank's rows to the longest block for
the collective and trims the padding before anything is counted, so concatenating the blocks in
rank order gives the rows in prompt order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def dist_active() -> bool:
    """True if a torch.distributed process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_bounds(num_items: int, rank: int, world_size: int, batch_size: int = 1) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block of whole global batches; block sizes differ by at most a batch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size} (eval.batch_size)")
    num_batches = -(-num_items // batch_size)
    first, last = rank * num_batches // world_size, (rank + 1) * num_batches // world_size
    return min(first * batch_size, num_items), min(last * batch_size, num_items)


def shard_indices(num_items: int, rank: int, world_size: int, batch_size: int = 1) -> range:
    """The prompt indices rank evaluates."""
    return range(*shard_bounds(num_items, rank, world_size, batch_size))


def block_counts(num_items: int, world_size: int, batch_size: int = 1, limit: int | None = None) -> list[int]:
    """Per-rank number of indices below `limit` (all of them if None)."""
    cap = num_items if limit is None else min(limit, num_items)
    counts = []
    for r in range(world_size):
        start, stop = shard_bounds(num_items, r, world_size, batch_size)
        counts.append(max(0, min(stop, cap) - start))
    return counts


def gather_rows(local: torch.Tensor, counts: list[int], rank: int | None = None) -> torch.Tensor:
    """All ranks' rows concatenated in rank order (every rank gets it); counts[r] rows come from rank r.

    `rank` is this process's rank (DistInfo.rank, as the shards were cut); None asks torch.distributed.
    """
    if not dist_active():
        assert len(counts) == 1 and local.shape[0] == counts[0], (counts, local.shape)
        return local
    rank = dist.get_rank() if rank is None else rank
    assert local.shape[0] == counts[rank], (rank, counts, local.shape)
    longest = max(counts)
    if longest == 0:
        return local
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def barrier() -> None:
    """dist.barrier() when distributed, else nothing."""
    if dist_active():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """The object of rank `src` on every rank (itself when not distributed)."""
    if not dist_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_rank_result(fn: Callable[[], T], *, is_main: bool) -> T:
    """`fn()` run on rank 0 only, its result on every rank; if it raised, every rank raises its exception.

    The other ranks wait in the broadcast: without passing the failure along they would wait there for the
    collective timeout while rank 0 had already stopped.
    """
    outcome: tuple[bool, Any] | None = None
    if is_main:
        try:
            outcome = (True, fn())
        except Exception as exc:  # noqa: BLE001 -- passed to every rank and raised there, rank 0 included
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)  # type: ignore[misc]
    if not ok:
        raise value
    return value
