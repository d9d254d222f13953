"""The embedded default dataset: procedurally drawn pictures whose captions describe them.

Each picture holds one to three shapes (circle, square, triangle, ...) of named colours at named
positions on a plain background, and its caption says exactly that ("a white background with a red
circle on the left and a blue square at the bottom"), so text conditioning is learnable. The background
comes first: the text encoder is causal, so a colour word cannot see the words after it, and a
background colour named last ("... on a white background") looks like any object's colour until the
final word; named first, it sits at a fixed token position that cross-attention finds at once. Written in
the real formats: LAION-style webdataset shards of KEY.jpg / KEY.txt / KEY.json, a COCO-style
val2014_30k.tsv with prompts of the same kind, and the matching square reference images (PNG) from
which FID statistics are computed. Everything is a pure function of the seed.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from sd_mlperf.config.schema import Config, SyntheticDataConfig
from sd_mlperf.data.coco import Prompt, write_prompts
from sd_mlperf.data.shards import write_shard
from sd_mlperf.utils.files import atomic_path, atomic_write_text
from sd_mlperf.utils.logging import logger

if TYPE_CHECKING:
    import torch

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (15, 15, 15), "white": (245, 245, 245),
    "grey": (128, 128, 128), "pink": (240, 120, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Position name -> centre as a fraction of the (square) picture.
POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
             "at the bottom": (0.5, 0.75), "in the centre": (0.5, 0.5)}
# Independent streams of scenes from one seed: training pictures, validation prompts, and the pictures
# the toy VAE is fitted to (sd_mlperf.data.toy_vae), which are neither.
TRAIN_STREAM, VAL_STREAM, VAE_FIT_STREAM = 0, 1, 2
COMPLETE_MARKER = ".complete.json"
DATA_VERSION = 2
"""Bumped when the pictures or captions change (2: the background is named first), so old datasets are remade."""
PROMPTS_FILE, VAL_IMAGES_DIR = "val2014_30k.tsv", "val_images"  # in data.synthetic_dir
VAL_IMAGE_ID_BASE = 100000


@dataclass(frozen=True)
class SyntheticPaths:
    """Where make_synthetic_dataset wrote each part."""

    root: Path
    raw_shards: list[Path]
    prompts_file: Path
    val_images_dir: Path


def _scene(rng: np.random.Generator) -> tuple[str, list[tuple[str, str, str]]]:
    """A background colour and 1-3 (shape, colour, position) triples with distinct positions."""
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    num = int(rng.integers(1, 4))
    positions = rng.choice(len(POSITIONS), size=num, replace=False)
    items = []
    for p in positions:
        colour = background
        while colour == background:
            colour = names[rng.integers(len(names))]
        items.append((SHAPES[rng.integers(len(SHAPES))], colour, list(POSITIONS)[p]))
    return background, items


def _caption(background: str, items: list[tuple[str, str, str]]) -> str:
    def a(word: str) -> str:
        return ("an " if word[0] in "aeiou" else "a ") + word

    parts = [f"{a(colour)} {shape} {position}" for shape, colour, position in items]
    return f"{a(background)} background with " + " and ".join(parts)


def _draw(background: str, items: list[tuple[str, str, str]], size: int, width: int, height: int) -> Image.Image:
    """Draw the scene in the centre square of a width x height canvas (a centre crop keeps it all)."""
    img = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(img)
    x0, y0 = (width - size) // 2, (height - size) // 2
    r = size * 0.14
    for shape, colour, position in items:
        fx, fy = POSITIONS[position]
        cx, cy = x0 + fx * size, y0 + fy * size
        fill = COLOURS[colour]
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # cross
            w = r / 3
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return img


def make_train_sample(seed: int, index: int, size: int) -> tuple[bytes, str, dict]:
    """(JPEG bytes, caption, metadata) of training picture `index`: non-square so resize+crop do real work."""
    rng = np.random.default_rng([seed, TRAIN_STREAM, index])
    background, items = _scene(rng)
    long_side = size + size // 4 * int(rng.integers(1, 3))
    width, height = (long_side, size) if rng.integers(2) else (size, long_side)
    img = _draw(background, items, size, width, height)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    caption = _caption(background, items)
    meta = {"caption": caption, "width": width, "height": height, "synthetic_index": index,
            "objects": [{"shape": s, "colour": c, "position": p} for s, c, p in items]}
    return buf.getvalue(), caption, meta


def make_square_sample(seed: int, stream: int, index: int, size: int) -> tuple[Image.Image, str]:
    """(square picture, caption) number `index` of a stream of scenes (TRAIN/VAL/VAE_FIT_STREAM)."""
    rng = np.random.default_rng([seed, stream, index])
    background, items = _scene(rng)
    return _draw(background, items, size, size, size), _caption(background, items)


def make_val_sample(seed: int, index: int, size: int) -> tuple[Image.Image, str]:
    """(square reference picture, caption) of validation prompt `index`."""
    return make_square_sample(seed, VAL_STREAM, index, size)


def _marker(cfg: SyntheticDataConfig) -> dict:
    # fit_vae_steps shapes the toy VAE (its own record, data/toy_vae.py), not the dataset.
    return {"version": DATA_VERSION, **{k: v for k, v in asdict(cfg).items() if k != "fit_vae_steps"}}


def is_complete(out_dir: str | os.PathLike, cfg: SyntheticDataConfig) -> bool:
    """True if `out_dir` holds a finished dataset made with exactly these settings."""
    marker = Path(out_dir) / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text()) == _marker(cfg)
    except (OSError, ValueError):
        return False


def make_synthetic_dataset(out_dir: str | os.PathLike, cfg: SyntheticDataConfig) -> SyntheticPaths:
    """Write raw/NNNNN.tar shards, val2014_30k.tsv and val_images/<image_id>.png under `out_dir`."""
    if cfg.num_train_samples <= 0 or cfg.num_train_shards <= 0 or cfg.num_val_prompts <= 0:
        raise ValueError(f"data.synthetic sizes must be positive: num_train_samples={cfg.num_train_samples}, "
                         f"num_train_shards={cfg.num_train_shards}, num_val_prompts={cfg.num_val_prompts}.")
    if cfg.image_size < 8:
        raise ValueError(f"invalid value for 'data.synthetic.image_size': {cfg.image_size}; must be >= 8.")
    root = Path(out_dir)
    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    raw_dir, val_dir = root / "raw", root / VAL_IMAGES_DIR
    raw_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, cfg.num_train_samples, cfg.num_train_shards + 1).astype(int)
    shards = []
    for s in range(cfg.num_train_shards):
        samples = []
        for i in range(bounds[s], bounds[s + 1]):
            jpg, caption, meta = make_train_sample(cfg.seed, i, cfg.image_size)
            key = f"{s:05d}{i - bounds[s]:04d}"
            meta["key"] = key
            samples.append((key, {"jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta).encode()}))
        path = raw_dir / f"{s:05d}.tar"
        write_shard(path, samples)
        shards.append(path)
    prompts = []
    for i in range(cfg.num_val_prompts):
        img, caption = make_val_sample(cfg.seed, i, cfg.image_size)
        image_id = VAL_IMAGE_ID_BASE + i
        with atomic_path(val_dir / f"{image_id}.png", suffix=".png") as tmp:
            img.save(tmp, format="PNG")
        prompts.append(Prompt(image_id, i, caption))
    prompts_file = root / PROMPTS_FILE
    write_prompts(prompts_file, prompts)
    atomic_write_text(root / COMPLETE_MARKER, json.dumps(_marker(cfg), sort_keys=True))
    logger.info("synthetic dataset: %d training samples in %d shards, %d validation prompts (%dpx) in %s",
                cfg.num_train_samples, cfg.num_train_shards, cfg.num_val_prompts, cfg.image_size, root)
    return SyntheticPaths(root, shards, prompts_file, val_dir)


def ensure_synthetic_sources(cfg: Config) -> bool:
    """The dataset in `data.synthetic_dir` unless complete, then with `data.synthetic.fit_vae_steps` > 0 the toy VAE
    fitted to its pictures (sd_mlperf.data.toy_vae). True if the dataset was (re)written.

    Run it in one process (sd_mlperf.training.smoke_assets: rank 0, the others wait).
    """
    d = cfg.data
    assert d.synthetic_dir is not None, "ensure_synthetic_sources needs data.synthetic_dir"
    written = not is_complete(d.synthetic_dir, d.synthetic)
    if written:
        make_synthetic_dataset(d.synthetic_dir, d.synthetic)
    if d.synthetic.fit_vae_steps > 0:
        from sd_mlperf.data.toy_vae import ensure_toy_frozen_checkpoint

        ensure_toy_frozen_checkpoint(cfg)
    return written


def synthetic_latents_missing(cfg: Config) -> bool:
    """True if `data.train_shards` must still be precomputed from the synthetic raw shards (a latent format whose
    precompute is not complete); False for `data.train_format=images`, which reads the pictures themselves."""
    d = cfg.data
    if d.train_format == "images":
        return False
    from sd_mlperf.data.precompute import precompute_is_complete

    return not precompute_is_complete(d.train_shards, d.train_format)


def ensure_synthetic_latents(cfg: Config, vae: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """Precompute the raw synthetic shards into `data.train_shards` in `data.train_format` with the given frozen
    encoders, unless done (so a smoke run exercises precompute too). Run it in one process, after
    `ensure_synthetic_sources`."""
    d = cfg.data
    assert d.synthetic_dir is not None, "ensure_synthetic_latents needs data.synthetic_dir"
    if not synthetic_latents_missing(cfg):
        return
    from sd_mlperf.data.precompute import precompute_shards

    out = d.train_shards
    if any(c in out for c in "*?[{"):
        raise ValueError(f"invalid value for 'data.train_shards': {out!r}; with data.synthetic_dir set it "
                         f"must be a folder, where the precomputed synthetic shards are written.")
    raw = str(Path(d.synthetic_dir) / "raw")
    precompute_shards(raw, out, data_cfg=d, vae=vae, text_encoder=text_encoder, rank=0, world_size=1)
