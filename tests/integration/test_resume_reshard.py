"""checkpoint.allow_reshard with the real trainer (torch DDP + ZeRO on gloo): 1 rank -> 2 ranks -> 1 rank.

The global batch stays 4 (1 rank x 4, 2 ranks x 2). Each resume must carry the weights and the whole
AdamW state over exactly (ZeRO's shards on 2 ranks are the 1-rank AdamW's state, split; merged back on
1 rank), continue the step and sample counts, restart the noise generator from (seed, rank, step),
and train on. One spawned 2-rank job (about 10 s of start-up); the 1-rank phases run in the test process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.multiprocess_helpers import free_port, set_torchrun_env

COMMON = ["checkpoint.allow_reshard=true", "parallel.distributed_optimizer=true",
          "training.checkpoint_every_samples=8"]  # global batch 4: a checkpoint every 2 steps
ONE_RANK = ["training.micro_batch_size=4"]
TWO_RANKS = ["parallel.gpus_per_node=2", "training.micro_batch_size=2"]


def _adam_state(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW state by parameter name, for the parameters whose state this rank holds."""
    names = {p: n for n, p in trainer.dp.unwrapped.named_parameters()}
    return {names[p]: {k: v.clone() for k, v in s.items()} for p, s in trainer.dp.local_optimizer.state.items()}


def _snapshot(trainer, losses) -> dict:
    return {"step": trainer.state.step, "samples": trainer.state.samples_count, "losses": losses,
            "weights": {k: v.clone() for k, v in trainer.dp.unwrapped.state_dict().items()},
            "adam": _adam_state(trainer), "seed": trainer.generator.initial_seed()}


def _run(cfg, dist, batches):
    from sd_mlperf.training.build import build_trainer
    from tests.unit.training._helpers import ListLoader, conditioner, record_losses

    loader = ListLoader(batches)
    trainer = build_trainer(cfg, dist, evaluator=None, data=(loader, conditioner))
    resumed = {**_snapshot(trainer, []), "loader_pos": loader.pos}
    losses = record_losses(trainer)
    trainer.fit()
    trainer.close()
    return resumed, _snapshot(trainer, losses)


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from tests.unit.training._helpers import make_batches, make_cfg

    torch.set_num_threads(1)
    set_torchrun_env(rank, 2, port)
    cfg = make_cfg(Path(out_dir), *COMMON, *TWO_RANKS, "training.max_steps=4")
    dist = init_distributed(cfg.run, cfg.parallel)
    try:
        result = _run(cfg, dist, make_batches(4, seed=20 + rank))
    finally:
        destroy_distributed()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _assert_same_adam(got: dict, want: dict) -> None:
    assert set(got) <= set(want)
    for name, state in got.items():
        assert set(state) == set(want[name]) == {"step", "exp_avg", "exp_avg_sq"}, name
        assert all(torch.equal(state[k].float(), want[name][k].float()) for k in state), name


@pytest.mark.slow
def test_reshard_one_to_two_to_one_rank_keeps_weights_and_adam_state(tmp_path):
    from sd_mlperf.parallel.distributed import rank_seed
    from tests.unit.training._helpers import cpu_dist, make_batches, make_cfg

    # 1 rank x 4: steps 1-2, checkpoint at step 2.
    _, one = _run(make_cfg(tmp_path, *COMMON, *ONE_RANK, "training.max_steps=2"), cpu_dist(),
                  make_batches(4, batch_size=4))
    assert one["step"] == 2 and len(one["adam"]) == len(one["weights"])

    # 2 ranks x 2: resume step 2 from the 1-rank checkpoint, train steps 3-4, checkpoint at 4.
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    seed = make_cfg(tmp_path).run.seed
    for rank, (resumed, _) in enumerate(ranks):
        assert (resumed["step"], resumed["samples"], resumed["loader_pos"]) == (2, 8, 2)
        # A fresh noise stream per (run.seed, rank, step): not the 1-rank run's, not another rank's.
        assert resumed["seed"] == (rank_seed(seed, rank) + 1_000_003 * 2) % 2**63  # utils.seeds.stream_seed
        assert all(torch.equal(resumed["weights"][k], v) for k, v in one["weights"].items())
        assert resumed["adam"]
        _assert_same_adam(resumed["adam"], one["adam"])
    shards = [set(resumed["adam"]) for resumed, _ in ranks]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(one["adam"])  # ZeRO split the state
    finals = [final for _, final in ranks]
    assert all(f["step"] == 4 and f["samples"] == 16 and len(f["losses"]) == 2 for f in finals)
    assert all(math.isfinite(x) for f in finals for x in f["losses"])
    assert all(torch.equal(finals[0]["weights"][k], finals[1]["weights"][k]) for k in finals[0]["weights"])

    # 1 rank x 4 again: resume step 4 from the 2-rank checkpoint, merging both ranks' AdamW shards.
    resumed, last = _run(make_cfg(tmp_path, *COMMON, *ONE_RANK, "training.max_steps=5"), cpu_dist(),
                         make_batches(4, batch_size=4))
    assert (resumed["step"], resumed["samples"], resumed["loader_pos"]) == (4, 16, 4)
    assert all(torch.equal(resumed["weights"][k], v) for k, v in finals[0]["weights"].items())
    merged = {**finals[0]["adam"], **finals[1]["adam"]}
    assert set(resumed["adam"]) == set(merged)
    _assert_same_adam(resumed["adam"], merged)
    assert last["step"] == 5 and last["samples"] == 20 and math.isfinite(last["losses"][0])


def test_reshard_that_changes_the_global_batch_is_refused(tmp_path):
    from sd_mlperf.training.build import build_trainer
    from sd_mlperf.training.checkpoint_files import save_file
    from tests.unit.training._helpers import ListLoader, cpu_dist, make_batches, make_cfg

    _run(make_cfg(tmp_path, *COMMON, *ONE_RANK, "training.max_steps=2"), cpu_dist(), make_batches(2, batch_size=4))
    model = tmp_path / "run" / "checkpoints" / "step_0000002" / "model.pt"
    saved = torch.load(model, weights_only=True)
    save_file({**saved, "world_size": 2}, model)  # as if 2 ranks x 2 had written it (global batch 4)
    save_file(torch.load(model.with_name("rank_00000.pt"), weights_only=True), model.with_name("rank_00001.pt"))
    cfg = make_cfg(tmp_path, *COMMON, "training.micro_batch_size=2", "training.max_steps=3")  # 1 rank x 2
    with pytest.raises(ValueError, match="global batch of 4 on 2 ranks; this run's is 2 on 1.*= 4"):
        build_trainer(cfg, cpu_dist(), evaluator=None, data=(ListLoader(make_batches(2)), lambda b, **k: b))
