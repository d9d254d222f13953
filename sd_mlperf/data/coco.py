"""COCO-2014 validation prompts (val2014_30k.tsv) and FID reference statistics (val2014_30k_stats.npz)."""

from __future__ import annotations

import csv
import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from sd_mlperf.utils.files import atomic_path, atomic_write_text

PROMPT_COLUMNS = ("image_id", "id", "caption")
FID_FEATURE_DIM = 2048


@dataclass(frozen=True)
class Prompt:
    """One validation prompt: the COCO image id, the caption id and the caption."""

    image_id: int
    id: int
    caption: str


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a tab-separated prompts file with a header holding image_id, id and caption."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty prompts file; expected a header with columns {', '.join(PROMPT_COLUMNS)}.")
        missing = [c for c in PROMPT_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks column(s) {missing}; the file must be tab-separated "
                             f"with columns {', '.join(PROMPT_COLUMNS)} (like MLCommons' val2014_30k.tsv).")
        cols = [header.index(c) for c in PROMPT_COLUMNS]
        prompts = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_no}: {len(row)} fields, the header has {len(header)}; "
                                 f"is a caption holding a tab?")
            try:
                prompts.append(Prompt(int(row[cols[0]]), int(row[cols[1]]), row[cols[2]]))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: image_id and id must be integers ({exc}).") from exc
    if not prompts:
        raise ValueError(f"{path}: no prompts after the header.")
    return prompts


def write_prompts(path: str | os.PathLike, prompts: list[Prompt]) -> None:
    """Write prompts in the val2014_30k.tsv format (atomically); tabs and newlines in captions become spaces."""
    buf = io.StringIO()
    buf.write("\t".join(PROMPT_COLUMNS) + "\n")
    for p in prompts:
        caption = " ".join(p.caption.split())
        buf.write(f"{p.image_id}\t{p.id}\t{caption}\n")
    atomic_write_text(path, buf.getvalue())


def read_fid_stats(path: str | os.PathLike, feature_dim: int = FID_FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) as float64 from an npz with keys mu and sigma; D defaults to Inception's 2048."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID statistics file {path} does not exist (eval.fid_stats).")
    fix = "expected an .npz with float arrays mu and sigma, like MLCommons' val2014_30k_stats.npz"
    try:  # numpy reports bad files with many types (BadZipFile is neither an OSError nor a ValueError)
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                keys = sorted(data.files)
                arrays = {k: data[k] for k in ("mu", "sigma") if k in keys}  # reads (and checks) the arrays
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc}); {fix}.") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not an .npz; {fix}.")
    if len(arrays) != 2:
        raise ValueError(f"{path}: FID statistics need keys 'mu' and 'sigma', found {keys}.")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise ValueError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected ({feature_dim},) and "
                         f"({feature_dim}, {feature_dim}) for {feature_dim}-d features.")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma holds NaN or inf values.")
    return mu.astype(np.float64), sigma.astype(np.float64)


def write_fid_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) as float64 npz, atomically."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    assert sigma.shape == (mu.shape[0], mu.shape[0]), (mu.shape, sigma.shape)
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
