"""agree_on_resume over a real 2-process gloo group: ranks that chose the same checkpoint go on; ranks that chose
differently (a file one rank could not read or verify) all stop with every rank's choice named."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from sd_mlperf.parallel.distributed import agree_on_resume
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.errors import UserError
from tests.multiprocess_helpers import free_port


def _rank(rank: int, port: int, choices: list, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist = DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), backend="gloo")
    results = []
    for choice in choices:
        mine = choice[rank]
        try:
            results.append(("ok", str(agree_on_resume(None if mine is None else Path(mine), dist))))
        except UserError as exc:
            results.append(("refused", str(exc)))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_resume_the_same_checkpoint_or_stop_together(tmp_path):
    choices = [("/run/checkpoints/step_0000020", "/run/checkpoints/step_0000020"),
               (None, None),
               ("/run/checkpoints/step_0000020", "/run/checkpoints/step_0000010"),
               ("/run/checkpoints/step_0000020", None)]
    mp.spawn(_rank, args=(free_port(), choices, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        same, fresh, split, one_fresh = torch.load(tmp_path / f"rank{rank}.pt")
        assert same == ("ok", "/run/checkpoints/step_0000020") and fresh == ("ok", "None")
        assert split == ("refused", "the ranks chose different checkpoints to resume (rank 0: "
                         "/run/checkpoints/step_0000020, rank 1: /run/checkpoints/step_0000010): a checkpoint file "
                         "that some rank could not read or verify (see that rank's warnings). Repair or delete it, "
                         "or set training.resume to one checkpoint path (or never).")
        assert one_fresh[0] == "refused" and "rank 1: none (fresh start)" in one_fresh[1]


def test_one_process_takes_its_own_choice():
    one = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="none")
    assert agree_on_resume(Path("/x"), one) == Path("/x") and agree_on_resume(None, one) is None
