"""Helpers for the data tests: tiny configs and moment shards written in the real format."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from sd_mlperf.config.load import vae_downsample_factor
from sd_mlperf.config.schema import DataConfig, VAEConfig
from sd_mlperf.data.shards import write_shard

IMAGE_SIZE = 32  # latents 4x4
FACTOR = vae_downsample_factor(VAEConfig())  # the tiny test VAEs downsample like SD2's: 8
LATENT = IMAGE_SIZE // FACTOR
EMB_DIM = 16


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def data_config(**overrides) -> DataConfig:
    """A DataConfig for tiny CPU tests (no workers, small buffer)."""
    base = dict(train_shards="unset", image_size=IMAGE_SIZE, num_workers=0, pin_memory=False,
                shuffle_buffer_samples=16, decode_backend="pil", train_format="moments")
    base.update(overrides)
    return DataConfig(**base)


def moment_sample(index: int, *, embeddings: bool) -> dict[str, bytes]:
    """One sample whose moments are filled with its global index (so tests can tell samples apart)."""
    parts = {"npy": npy(np.full((1, 8, LATENT, LATENT), float(index), np.float32)),
             "txt": f"caption {index}".encode()}
    if embeddings:
        parts["emb.npy"] = npy(np.full((77, EMB_DIM), index % 1000, np.float16))
    return parts


def write_moment_shards(folder: Path, num_shards: int, per_shard: int, *, embeddings: bool = False,
                        edit=None) -> list[Path]:
    """Shards NNNNN.tar of moments (+ embeddings); `edit(index, parts)` may damage a sample (return None to drop)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            index = s * per_shard + i
            parts = moment_sample(index, embeddings=embeddings)
            if edit is not None:
                parts = edit(index, parts)
            samples.append((f"{s:05d}{i:04d}", parts))
        path = folder / f"{s:05d}.tar"
        write_shard(path, samples)
        paths.append(path)
    return paths


def batch_ids(batch: dict) -> list[int]:
    """Global sample indices of a moments batch."""
    return [int(v) for v in batch["moments"][:, 0, 0, 0]]


