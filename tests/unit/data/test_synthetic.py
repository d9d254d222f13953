"""The synthetic dataset: real formats, captions that describe the pictures, deterministic from the seed."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from sd_mlperf.config import load_config
from sd_mlperf.data.coco import read_prompts
from sd_mlperf.data.precompute import MANIFEST
from sd_mlperf.data.shards import index_shard
from sd_mlperf.data.synthetic import (
    COLOURS,
    POSITIONS,
    ensure_synthetic_latents,
    ensure_synthetic_sources,
    is_complete,
    make_synthetic_dataset,
    synthetic_latents_missing,
)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synthetic_cfg):
    make_synthetic_dataset(tmp_path / "a", synthetic_cfg)
    make_synthetic_dataset(tmp_path / "b", synthetic_cfg)
    make_synthetic_dataset(tmp_path / "c", dataclasses.replace(synthetic_cfg, seed=4))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_layout_formats_and_sizes(tmp_path, synthetic_cfg):
    paths = make_synthetic_dataset(tmp_path, synthetic_cfg)
    assert [p.name for p in paths.raw_shards] == ["00000.tar", "00001.tar"]
    samples = [s for p in paths.raw_shards for s in index_shard(str(p)).samples]
    assert len(samples) == synthetic_cfg.num_train_samples
    assert all(set(s.members) == {"jpg", "txt", "json"} for s in samples)
    assert len({s.key for s in samples}) == len(samples)
    prompts = read_prompts(paths.prompts_file)
    assert len(prompts) == synthetic_cfg.num_val_prompts
    for p in prompts:
        img = Image.open(paths.val_images_dir / f"{p.image_id}.png")
        assert img.size == (synthetic_cfg.image_size, synthetic_cfg.image_size)
    assert is_complete(tmp_path, synthetic_cfg)
    assert not is_complete(tmp_path, dataclasses.replace(synthetic_cfg, num_val_prompts=4))


def test_captions_describe_the_pictures(tmp_path, synthetic_cfg):
    """Each object named in the caption is drawn in its colour at its position (after a centre crop)."""
    paths = make_synthetic_dataset(tmp_path, synthetic_cfg)
    index = index_shard(str(paths.raw_shards[0]))
    with open(paths.raw_shards[0], "rb") as f:
        for ref in index.samples:
            f.seek(ref.members["json"][0])
            meta = json.loads(f.read(ref.members["json"][1]))
            f.seek(ref.members["txt"][0])
            caption = f.read(ref.members["txt"][1]).decode()
            f.seek(ref.members["jpg"][0])
            img = np.asarray(Image.open(io.BytesIO(f.read(ref.members["jpg"][1]))).convert("RGB"), np.float32)
            assert caption == meta["caption"] and (img.shape[1], img.shape[0]) == (meta["width"], meta["height"])
            size = synthetic_cfg.image_size
            top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
            for obj in meta["objects"]:
                assert f"{obj['colour']} {obj['shape']} {obj['position']}" in caption
                fx, fy = POSITIONS[obj["position"]]
                pixel = img[top + int(fy * size), left + int(fx * size)]
                assert np.abs(pixel - np.array(COLOURS[obj["colour"]])).max() < 40, (caption, pixel)


REPO = Path(__file__).resolve().parents[3]
SMALL_SYNTHETIC = ["data.synthetic.num_train_samples=6", "data.synthetic.num_train_shards=2",
                   "data.synthetic.num_val_prompts=2", "data.synthetic.image_size=32", "data.image_size=32"]


def test_ensure_synthetic_sources_and_latents_are_idempotent(tmp_path, tiny_vae):
    smoke = str(REPO / "conf" / "smoke.yaml")
    cfg = load_config([smoke], [*SMALL_SYNTHETIC, f"run.output_dir={tmp_path}", "data.train_format=moments",
                                "model.vae.base_channels=8", "model.vae.norm_groups=4"])
    assert ensure_synthetic_sources(cfg) and synthetic_latents_missing(cfg)
    ensure_synthetic_latents(cfg, tiny_vae, None)
    latents = Path(cfg.data.train_shards)
    assert json.loads((latents / MANIFEST).read_text())["samples"] == 6 and not synthetic_latents_missing(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in Path(cfg.data.synthetic_dir).rglob("*") if p.is_file()}
    assert not ensure_synthetic_sources(cfg)  # complete: nothing rewritten
    ensure_synthetic_latents(cfg, tiny_vae, None)
    assert stamps == {p: p.stat().st_mtime_ns for p in Path(cfg.data.synthetic_dir).rglob("*") if p.is_file()}


def test_images_format_needs_no_latents(tmp_path):
    cfg = load_config([str(REPO / "conf" / "smoke.yaml")], [f"run.output_dir={tmp_path}", "data.train_format=images"])
    assert not synthetic_latents_missing(cfg)
