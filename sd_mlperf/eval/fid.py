"""FID reference statistics: computing them from a folder of images, and making sure they exist.

The statistics of real images are (mu, sigma) of the FID Inception's 2048-d features, as
pytorch-fid's `save_fid_stats` computes them: each image read with PIL as RGB, ToTensor (float
[0, 1], no resize before the network, which resizes to 299 bilinear itself), np.mean / np.cov.
`sd-mlperf fid-stats` exposes this; `ensure_folder_fid_stats` makes the smoke run's statistics once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sd_mlperf.eval.metrics import feature_statistics
from sd_mlperf.models.precision import autocast
from sd_mlperf.utils.logging import logger

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def list_images(image_dir: str | os.PathLike) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name; an empty or missing folder is an error."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"{root}: found {len(files)} image(s) ({', '.join(IMAGE_EXTENSIONS)}); FID statistics "
                         "need at least 2")
    return files


def image_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """The images of `files` as RGB float tensors in [0, 1], up to `batch_size` a batch, in order.

    Consecutive images of one size form a batch; a size change starts a new one. An unreadable file is a
    ValueError naming it.
    """
    batch: list[torch.Tensor] = []
    for path in files:
        try:
            with Image.open(path) as img:
                x = TF.to_tensor(img.convert("RGB"))
        except OSError as exc:  # PIL's errors for truncated or unknown files often omit the name
            raise ValueError(f"{path}: cannot read the image ({exc}); replace or remove it, the statistics "
                             "need every image of the folder") from exc
        if batch and (len(batch) == batch_size or batch[0].shape != x.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(x)
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def image_folder_features(image_dir: str | os.PathLike, inception: torch.nn.Module, *, batch_size: int = 50,
                          device: torch.device | str = "cpu", precision: str = "fp32") -> torch.Tensor:
    """(N, 2048) float32 Inception features of every image in a folder, in file-name order."""
    device = torch.device(device)
    files = list_images(image_dir)
    feats = []
    for batch in image_batches(files, batch_size):
        with autocast(precision, device):
            feats.append(inception(batch.to(device)).float().cpu())
    return torch.cat(feats)


def image_folder_stats(image_dir: str | os.PathLike, inception: torch.nn.Module, *, batch_size: int = 50,
                       device: torch.device | str = "cpu", precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of a folder's images, the format of val2014_30k_stats.npz."""
    feats = image_folder_features(image_dir, inception, batch_size=batch_size, device=device, precision=precision)
    return feature_statistics(feats)


def ensure_folder_fid_stats(image_dir: str | os.PathLike, out: str | os.PathLike, inception: torch.nn.Module) -> bool:
    """Write the statistics of a folder's images to `out` unless that file exists; True if written.

    Computed on the Inception's device in fp32. Run it in one process (smoke runs: sd_mlperf.training.smoke_assets).
    """
    from sd_mlperf.data.coco import write_fid_stats

    out = Path(out)
    if out.is_file():
        return False
    device = next(inception.parameters()).device
    mu, sigma = image_folder_stats(image_dir, inception, device=device)
    write_fid_stats(out, mu, sigma)
    logger.info("wrote FID reference statistics of %s to %s", image_dir, out)
    return True


def require_fid_stats(path: str | os.PathLike) -> Path:
    """`eval.fid_stats` as a Path; a missing file is an error that says where reference statistics come from."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.fid_stats={path} does not exist. Use MLCommons' val2014_30k_stats.npz, or make statistics "
            "with `sd-mlperf fid-stats --images DIR --out FILE` and set eval.fid_stats to it.")
    return path
