"""Seeds derived from the run seed: one rule for every independent stream, and one for moving a stream on."""

from __future__ import annotations

import numpy as np

STREAM_STRIDE = 1_000_003
"""A prime step between the seeds of a stream restarted at successive positions."""


def derive_seed(*keys: int) -> int:
    """A 63-bit seed of its own for `keys` (for example (run seed, rank)): independent streams, not seed + k."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def stream_seed(seed: int, position: int) -> int:
    """The seed of a stream restarted at `position` (a step or batch count): moved on, so nothing replays in order."""
    return (seed + STREAM_STRIDE * position) % 2**63
