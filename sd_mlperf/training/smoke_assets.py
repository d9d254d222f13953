"""The smoke run's assets, made before training as a separate step: the benchmark path has no smoke branches.

A run on the embedded synthetic dataset (`data.synthetic_dir` set: conf/smoke.yaml, conf/learn.yaml) reads
files that nobody downloads. `prepare_smoke_assets` makes them, each only if missing or stale, in the order
they depend on each other:

1. the pictures: raw training shards, val2014_30k.tsv and the validation images (sd_mlperf.data.synthetic);
2. with `data.synthetic.fit_vae_steps` > 0, the toy VAE at `model.frozen_checkpoint` (sd_mlperf.data.toy_vae);
3. the latents in `data.train_shards`, precomputed with the frozen encoders (unless `data.train_format=images`;
   not for an evaluation, which reads only the pictures, the frozen checkpoint and the statistics);
4. the FID reference statistics of the validation images at `eval.fid_stats`.

After it, `build_trainer` and `build_evaluator` read those paths as they read the benchmark's. It composes
data and eval steps, so it sits above both, beside `build_trainer`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_mlperf.config.schema import Config
from sd_mlperf.utils.dist_info import DistInfo


def prepare_smoke_assets(cfg: Config, dist: DistInfo, *, for_training: bool = True) -> None:
    """Make the synthetic dataset's files (see the module docstring); nothing without `data.synthetic_dir`.

    Idempotent. Rank 0 makes them while the other ranks wait at a barrier; every rank then checks that it sees
    them (the run directory must be on a file system all ranks share). Call it once per process, after
    distributed init and before `build_trainer` (or, with `for_training=False`, before scoring checkpoints).
    """
    if cfg.data.synthetic_dir is None:
        return
    if dist.is_main:
        _make_assets(cfg, dist, for_training=for_training)
    if dist.world_size > 1:
        torch.distributed.barrier()
    stats = Path(cfg.eval.fid_stats)
    if not stats.is_file():
        raise FileNotFoundError(f"eval.fid_stats={stats} does not exist on rank {dist.rank} after rank 0 made it; "
                                "the run directory must be on a file system that all ranks share")


def _make_assets(cfg: Config, dist: DistInfo, *, for_training: bool) -> None:
    from sd_mlperf.data.synthetic import (
        VAL_IMAGES_DIR,
        ensure_synthetic_latents,
        ensure_synthetic_sources,
        synthetic_latents_missing,
    )
    from sd_mlperf.eval.fid import ensure_folder_fid_stats
    from sd_mlperf.eval.inception import load_fid_inception
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders

    ensure_synthetic_sources(cfg)  # the pictures, then the toy VAE fitted to them: before the frozen parts load
    if for_training and synthetic_latents_missing(cfg):
        vae, text_encoder = build_frozen_encoders(cfg.model)  # the ones the trainer loads (same file or seed)
        ensure_synthetic_latents(cfg, vae.to(dist.device).eval(), text_encoder.to(dist.device).eval())
    if not Path(cfg.eval.fid_stats).is_file():
        # On the CPU in fp32, as the evaluator's Inception is loaded: the same numbers whatever run.device is.
        inception = load_fid_inception(cfg.eval.inception_weights, "cpu")
        ensure_folder_fid_stats(Path(cfg.data.synthetic_dir) / VAL_IMAGES_DIR, cfg.eval.fid_stats, inception)
