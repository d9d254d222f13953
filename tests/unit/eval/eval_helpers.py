"""Shared pieces of the eval tests: the smoke config shrunk to a few prompts and 2 DDIM steps."""

from __future__ import annotations

from pathlib import Path

import torch

from sd_mlperf.config import load_config
from sd_mlperf.config.schema import Config
from tests.multiprocess_helpers import free_port  # noqa: F401  (re-exported for the tests here)

REPO = Path(__file__).resolve().parents[3]
SMOKE = REPO / "conf" / "smoke.yaml"

TINY_EVAL = [
    "data.synthetic.num_train_samples=4", "data.synthetic.num_train_shards=1", "data.synthetic.num_val_prompts=5",
    "data.synthetic.image_size=32", "data.image_size=32", "eval.num_prompts=5", "eval.ddim_steps=2",
    "eval.batch_size=3", "eval.num_grid_images=3", "logging.progress_bar='off'",
]


def make_cfg(tmp_path: Path, *overrides: str) -> Config:
    """conf/smoke.yaml with its run directory under tmp_path and a 5-prompt, 2-step evaluation."""
    return load_config([SMOKE], [f"run.output_dir={tmp_path}", "run.name=run", "run.seed=1234", *TINY_EVAL,
                                 *overrides])


def build_parts(cfg: Config):
    """(unet, vae, text_encoder): the same random weights in every process."""
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders
    from sd_mlperf.models.unet import build_unet

    torch.manual_seed(1234)
    unet = build_unet(cfg.model.unet)
    vae, text_encoder = build_frozen_encoders(cfg.model)
    return unet.eval(), vae, text_encoder


