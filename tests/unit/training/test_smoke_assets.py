"""prepare_smoke_assets: the synthetic run's files made once before training; build_trainer makes none of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from _helpers import cpu_dist, make_batches, make_cfg, make_trainer

from sd_mlperf.data.coco import read_fid_stats
from sd_mlperf.data.precompute import MANIFEST
from sd_mlperf.data.synthetic import VAL_IMAGES_DIR
from sd_mlperf.eval.fid import image_folder_stats
from sd_mlperf.eval.inception import load_fid_inception
from sd_mlperf.training.smoke_assets import prepare_smoke_assets
from tests.multiprocess_helpers import free_port

SMALL = ["data.synthetic.num_train_samples=4", "data.synthetic.num_train_shards=2", "data.synthetic.num_val_prompts=2",
         "data.synthetic.image_size=32", "data.image_size=32"]


def _stamps(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_prepare_makes_pictures_latents_and_fid_statistics_once(tmp_path):
    cfg = make_cfg(tmp_path, *SMALL)
    prepare_smoke_assets(cfg, cpu_dist())
    root = Path(cfg.data.synthetic_dir)
    assert Path(cfg.eval.prompts_file).is_file() and len(list((root / VAL_IMAGES_DIR).iterdir())) == 2
    assert json.loads((Path(cfg.data.train_shards) / MANIFEST).read_text())["samples"] == 4
    mu, sigma = read_fid_stats(cfg.eval.fid_stats)
    ref_mu, ref_sigma = image_folder_stats(root / VAL_IMAGES_DIR, load_fid_inception(None, "cpu"))
    np.testing.assert_array_equal(mu, ref_mu)  # the evaluator's Inception (random, fixed seed) on the CPU
    np.testing.assert_array_equal(sigma, ref_sigma)
    stamps = _stamps(root)
    prepare_smoke_assets(cfg, cpu_dist())
    assert _stamps(root) == stamps  # idempotent: nothing rewritten


def test_for_an_evaluation_the_latents_are_not_made(tmp_path):
    cfg = make_cfg(tmp_path, *SMALL)
    prepare_smoke_assets(cfg, cpu_dist(), for_training=False)
    assert Path(cfg.eval.prompts_file).is_file() and Path(cfg.eval.fid_stats).is_file()
    assert not (Path(cfg.data.train_shards) / MANIFEST).exists()


def test_without_synthetic_dir_nothing_is_made(tmp_path):
    cfg = make_cfg(tmp_path, "data.synthetic_dir=null", f"data.train_shards={tmp_path}/shards",
                   f"eval.prompts_file={tmp_path}/p.tsv", f"eval.fid_stats={tmp_path}/missing.npz")
    prepare_smoke_assets(cfg, cpu_dist())
    assert list(tmp_path.iterdir()) == []


def test_build_trainer_makes_no_smoke_asset(tmp_path):
    """The benchmark path has no smoke branch: building on a smoke config writes none of the synthetic files."""
    cfg = make_cfg(tmp_path, *SMALL)
    trainer, _ = make_trainer(cfg, make_batches(2))
    trainer.close()
    assert not Path(cfg.data.synthetic_dir).exists()


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch

    import sd_mlperf.training.smoke_assets as smoke_assets
    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed
    from tests.multiprocess_helpers import set_torchrun_env
    from tests.unit.training._helpers import make_cfg

    torch.set_num_threads(1)
    set_torchrun_env(rank, 2, port)
    cfg = make_cfg(Path(out_dir), *SMALL, "parallel.gpus_per_node=2")
    dist = init_distributed(cfg.run, cfg.parallel)
    if rank == 1:
        def refuse(*args):
            raise AssertionError("only rank 0 makes the smoke assets")

        smoke_assets._make_assets = refuse
    try:
        smoke_assets.prepare_smoke_assets(cfg, dist)
        # Past the barrier every rank sees what rank 0 made.
        assert (Path(cfg.data.train_shards) / MANIFEST).is_file() and Path(cfg.eval.fid_stats).is_file()
    finally:
        destroy_distributed()
    (Path(out_dir) / f"rank{rank}.ok").touch()


@pytest.mark.slow
def test_two_ranks_rank_zero_makes_the_others_wait(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.ok").is_file() and (tmp_path / "rank1.ok").is_file()
