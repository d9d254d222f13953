"""Prompt sharding: contiguous blocks, no duplicates, nothing dropped, no padding; gathering in order."""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.eval.distributed import block_counts, gather_rows, main_rank_result, shard_bounds, shard_indices


@pytest.mark.parametrize("n", [1, 5, 8, 30000, 30001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_shards_cover_every_prompt_once(n, world, batch):
    seen = [i for r in range(world) for i in shard_indices(n, r, world, batch)]
    assert seen == list(range(n))  # in rank order, so concatenating blocks restores prompt order
    sizes = [len(shard_indices(n, r, world, batch)) for r in range(world)]
    assert max(sizes) - min(sizes) <= batch
    assert block_counts(n, world, batch) == sizes
    # Every rank's block starts on a global batch boundary: the batches are the same for any world size.
    assert all(shard_bounds(n, r, world, batch)[0] % batch == 0 or sizes[r] == 0 for r in range(world))


def test_block_counts_below_a_limit():
    # 10 prompts over 3 ranks: blocks [0,3) [3,6) [6,10); the first 4 prompts are 3 on rank 0, 1 on rank 1.
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert block_counts(10, 3, limit=4) == [3, 1, 0]
    assert block_counts(10, 3, limit=100) == [3, 3, 4]
    # Batches of 4: [0,4) [4,8) [8,10) -> one batch per rank.
    assert [shard_bounds(10, r, 3, 4) for r in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert block_counts(10, 3, 4, limit=5) == [4, 1, 0]


def test_gather_single_process_is_identity_and_bad_rank_raises():
    rows = torch.arange(6.0).view(3, 2)
    assert gather_rows(rows, [3]) is rows
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)


def test_gather_uses_the_rank_it_is_given(monkeypatch):
    # The caller's rank (DistInfo.rank, as the shards were cut) places its rows; torch.distributed is not asked.
    import sd_mlperf.eval.distributed as D

    def all_gather(parts, padded):  # two ranks: rank 0 holds [0, 1], this process (rank 1) one row [2]
        parts[0].copy_(torch.tensor([[0.0], [1.0]]))
        parts[1].copy_(padded)

    monkeypatch.setattr(D, "dist_active", lambda: True)
    monkeypatch.setattr(D.dist, "all_gather", all_gather)
    monkeypatch.setattr(D.dist, "get_rank", lambda: pytest.fail("asked torch.distributed for the rank"))
    out = gather_rows(torch.tensor([[2.0]]), [2, 1], rank=1)
    assert out.flatten().tolist() == [0.0, 1.0, 2.0]


def test_main_rank_result_returns_or_raises_in_one_process():
    assert main_rank_result(lambda: {"fid": 1.0}, is_main=True) == {"fid": 1.0}

    def fail() -> None:
        raise ValueError("corrupt index.jsonl")

    with pytest.raises(ValueError, match="corrupt index.jsonl"):
        main_rank_result(fail, is_main=True)


def _main_rank_worker(rank: int, port: int, out_dir: str) -> None:
    import os
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert main_rank_result(lambda: rank * 10 + 7, is_main=rank == 0) == 7  # rank 0's value everywhere

        def fail() -> None:
            raise ValueError(f"rank {rank} failed")

        with pytest.raises(ValueError, match="rank 0 failed"):  # rank 1 raises too instead of waiting
            main_rank_result(fail, is_main=rank == 0)
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.ok").touch()


@pytest.mark.slow  # two processes
def test_main_rank_result_passes_rank_zeros_failure_to_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from tests.multiprocess_helpers import free_port

    mp.spawn(_main_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.ok").is_file() and (tmp_path / "rank1.ok").is_file()
