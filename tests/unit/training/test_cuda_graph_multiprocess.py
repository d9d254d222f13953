"""training.cuda_graph=true on 2 gloo processes (torch DDP + ZeRO): the eager twin of the graphed step,
with its 11-step DDP warmup on the ZeRO shard's AdamW, trains bit-exactly like the default step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.multiprocess_helpers import free_port, set_torchrun_env

WORLD = 2




def _worker(rank: int, port: int, out_dir: str) -> None:
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from sd_mlperf.training.build import build_trainer
    from tests.unit.training._helpers import CONTEXT, ListLoader, conditioner, make_batches, make_cfg, record_losses

    torch.set_num_threads(1)
    set_torchrun_env(rank, WORLD, port)
    out = Path(out_dir)
    overrides = ["parallel.gpus_per_node=2", "parallel.distributed_optimizer=true", "training.max_steps=3",
                 f"model.text_encoder.context_length={CONTEXT[0]}"]
    batches = make_batches(3, seed=20 + rank)
    cfg = make_cfg(out / "eager", *overrides)
    dist = init_distributed(cfg.run, cfg.parallel)
    results = {}
    try:
        for name, extra in (("eager", []), ("graph", ["training.cuda_graph=true"])):
            loader = ListLoader(batches)
            trainer = build_trainer(make_cfg(out / name, *overrides, *extra), dist, evaluator=None,
                                    data=(loader, conditioner))
            losses = record_losses(trainer)
            trainer.fit()
            trainer.close()
            results[name] = (losses, {k: v.clone() for k, v in trainer.dp.unwrapped.state_dict().items()},
                             type(trainer.optimizer_step).__name__, trainer.dp.sharded)
    finally:
        destroy_distributed()
    torch.save(results, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_rank_graphed_step_twin_equals_default_step(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        eager_losses, eager_w, eager_kind, sharded = res["eager"]
        graph_losses, graph_w, graph_kind, _ = res["graph"]
        assert sharded and (eager_kind, graph_kind) == ("EagerTrainStep", "GraphedTrainStep")
        assert len(graph_losses) == 3 and graph_losses == eager_losses
        assert all(torch.equal(graph_w[k], eager_w[k]) for k in eager_w)
