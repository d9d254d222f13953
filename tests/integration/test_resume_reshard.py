"""checkpoint.allow_reshard with the real trainer (torch DDP + ZeRO on gloo): 1 rank -> 2 ranks -> 1 rank.

Each resume must carry the weights and the AdamW state over exactly (ZeRO's shards on 2 ranks are the
1-rank AdamW's state, split; merged back on 1 rank), continue the step and sample counts, and train on.
One spawned 2-rank job (about 10 s of start-up); the 1-rank phases run in the test process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.multiprocess_helpers import free_port, set_torchrun_env

COMMON = ["checkpoint.allow_reshard=true", "parallel.distributed_optimizer=true",
          "training.checkpoint_every_samples=4"]


def _adam_state(trainer) -> dict[str, torch.Tensor]:
    """exp_avg by parameter name, for the parameters whose AdamW state this rank holds."""
    names = {p: n for n, p in trainer.dp.unwrapped.named_parameters()}
    return {names[p]: s["exp_avg"].clone() for p, s in trainer.dp.local_optimizer.state.items() if "exp_avg" in s}


def _snapshot(trainer, losses) -> dict:
    return {"step": trainer.state.step, "samples": trainer.state.samples_count, "losses": losses,
            "weights": {k: v.clone() for k, v in trainer.dp.unwrapped.state_dict().items()},
            "adam": _adam_state(trainer)}


def _run(cfg, dist, batches):
    from sd_mlperf.trainer import build_trainer
    from tests.unit.training._helpers import ListLoader, conditioner, record_losses

    trainer = build_trainer(cfg, dist, evaluator=None, data=(ListLoader(batches), conditioner))
    resumed = _snapshot(trainer, [])
    losses = record_losses(trainer)
    trainer.fit()
    trainer.close()
    return resumed, _snapshot(trainer, losses)


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from tests.unit.training._helpers import make_batches, make_cfg

    torch.set_num_threads(1)
    set_torchrun_env(rank, 2, port)
    cfg = make_cfg(Path(out_dir), *COMMON, "parallel.gpus_per_node=2", "training.max_steps=4")
    dist = init_distributed(cfg.run, cfg.parallel)
    try:
        result = _run(cfg, dist, make_batches(4, seed=20 + rank))
    finally:
        destroy_distributed()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_reshard_one_to_two_to_one_rank_keeps_weights_and_adam_state(tmp_path):
    from tests.unit.training._helpers import cpu_dist, make_batches, make_cfg

    # 1 rank, GBS 2: steps 1-2, checkpoint at step 2.
    _, one = _run(make_cfg(tmp_path, *COMMON, "training.max_steps=2"), cpu_dist(), make_batches(4))
    assert one["step"] == 2 and len(one["adam"]) == len(one["weights"])

    # 2 ranks, GBS 4: resume step 2 from the 1-rank checkpoint, train steps 3-4, checkpoint at 4.
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for resumed, _ in ranks:
        assert (resumed["step"], resumed["samples"]) == (2, 4)
        assert all(torch.equal(resumed["weights"][k], v) for k, v in one["weights"].items())
        assert resumed["adam"] and all(torch.equal(v, one["adam"][k]) for k, v in resumed["adam"].items())
    shards = [set(resumed["adam"]) for resumed, _ in ranks]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(one["adam"])  # ZeRO split the state
    finals = [final for _, final in ranks]
    assert all(f["step"] == 4 and f["samples"] == 12 and len(f["losses"]) == 2 for f in finals)
    assert all(math.isfinite(x) for f in finals for x in f["losses"])
    assert all(torch.equal(finals[0]["weights"][k], finals[1]["weights"][k]) for k in finals[0]["weights"])

    # 1 rank again: resume step 4 from the 2-rank checkpoint, merging both ranks' AdamW shards.
    resumed, last = _run(make_cfg(tmp_path, *COMMON, "training.max_steps=5"), cpu_dist(), make_batches(4))
    assert (resumed["step"], resumed["samples"]) == (4, 12)
    assert all(torch.equal(resumed["weights"][k], v) for k, v in finals[0]["weights"].items())
    merged = {**finals[0]["adam"], **finals[1]["adam"]}
    assert set(resumed["adam"]) == set(merged)
    assert all(torch.equal(resumed["adam"][k], v) for k, v in merged.items())
    assert last["step"] == 5 and last["samples"] == 14 and math.isfinite(last["losses"][0])
