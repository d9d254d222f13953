"""Toy metrics: the validation pictures themselves score 1 / 1 / ~0, mismatched ones do not; built only for
synthetic prompts; training.target_toy is checked when the evaluator is built."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from eval_helpers import build_parts, make_cfg

from sd_mlperf.data.coco import read_prompts
from sd_mlperf.data.synthetic import VAL_STREAM, make_square_sample, make_synthetic_dataset
from sd_mlperf.eval.toy_metrics import CHANCE, NAMES, NoExtraMetrics, ToyMetrics, build_extra_metrics


def _prepared(tmp_path, *overrides):
    cfg = make_cfg(tmp_path, *overrides)
    make_synthetic_dataset(cfg.data.synthetic_dir, cfg.data.synthetic)
    return cfg


def _val_pictures(cfg) -> torch.Tensor:
    s = cfg.data.synthetic
    arrays = [np.asarray(make_square_sample(s.seed, VAL_STREAM, i, s.image_size)[0]) for i in range(s.num_val_prompts)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_the_validation_pictures_score_perfectly_and_mismatched_ones_do_not(tmp_path):
    cfg = _prepared(tmp_path)
    _, vae, _ = build_parts(cfg)
    prompts = read_prompts(cfg.eval.prompts_file)
    metrics = build_extra_metrics(cfg, prompts, prompts, vae=vae)
    assert isinstance(metrics, ToyMetrics)
    images = _val_pictures(cfg)
    indices = list(range(len(prompts)))
    rows = torch.cat([metrics.rows(images[:3], indices[:3]), metrics.rows(images[3:], indices[3:])])  # two batches
    assert rows.shape == (len(prompts), metrics.width) and rows.dtype == torch.float32
    own = metrics.summarise(rows)
    assert set(own) == set(NAMES)
    assert own["toy_background_acc"] == 1.0 and own["toy_object_acc"] == 1.0
    assert abs(own["toy_latent_fd"]) < 1e-3  # the reference pictures themselves
    shuffled = metrics.summarise(metrics.rows(images.roll(1, dims=0), indices))
    assert shuffled["toy_background_acc"] < 0.5 and shuffled["toy_object_acc"] < 0.5
    blank = metrics.summarise(metrics.rows(torch.full_like(images, 0.5), indices))
    assert blank["toy_latent_fd"] > 10 * abs(own["toy_latent_fd"]) + 1e-3
    assert CHANCE == {"toy_background_acc": 0.1, "toy_object_acc": 1 / 9}


def test_other_prompts_get_no_extra_metrics_and_no_toy_target(tmp_path):
    cfg = _prepared(tmp_path)
    other = tmp_path / "coco_like.tsv"
    shutil.copy(cfg.eval.prompts_file, other)
    _, vae, _ = build_parts(cfg)
    plain = make_cfg(tmp_path, f"eval.prompts_file={other}")
    prompts = read_prompts(other)
    metrics = build_extra_metrics(plain, prompts, prompts, vae=vae)
    assert isinstance(metrics, NoExtraMetrics) and metrics.summarise(torch.zeros(5, 0)) == {}
    with pytest.raises(ValueError, match="training.target_toy.*synthetic prompts"):
        build_extra_metrics(make_cfg(tmp_path, f"eval.prompts_file={other}", "training.target_toy.toy_object_acc=0.5"),
                            prompts, prompts, vae=vae)


@pytest.mark.parametrize("name", ["toy_latent_fd", "toy_colour"])
def test_a_toy_target_names_an_accuracy(tmp_path, name):
    cfg = _prepared(tmp_path, f"training.target_toy.{name}=0.5")
    _, vae, _ = build_parts(cfg)
    prompts = read_prompts(cfg.eval.prompts_file)
    with pytest.raises(ValueError, match=f"training.target_toy.*{name}"):
        build_extra_metrics(cfg, prompts, prompts, vae=vae)
