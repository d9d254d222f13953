"""The key of a cached score in RUN/eval_offline/scores.jsonl: everything that decides the score.

A score is reused only for the same checkpoint (the sha256 the trainer recorded in the index when it wrote the
file) and the same evaluation settings (`evaluation_settings`: the eval section but the keys that decide nothing,
the frozen encoders, the UNet and diffusion sections, and the identity of every input file: prompts, FID
statistics, Inception and CLIP weights). A changed setting or checkpoint is scored again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sd_mlperf.config.schema import Config
from sd_mlperf.training.eval_checkpoints import EVAL_CHECKPOINT_DIR
from sd_mlperf.utils.files import file_sha256

_HASHED_FILE_BYTES = 256 << 20
"""Files up to this size are identified by their sha256 in the score key; larger ones by size and mtime."""


def _file_identity(path: str | None) -> Any:
    """What identifies an input file in the score key: its path and its sha256 (or size and mtime when large)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return str(path)
    size = p.stat().st_size
    if size <= _HASHED_FILE_BYTES:
        return {"path": str(path), "sha256": file_sha256(p)}
    return {"path": str(path), "bytes": size, "mtime_ns": p.stat().st_mtime_ns}


SETTINGS_NOT_SCORED = ("inline", "num_grid_images", "seed")
"""eval keys that do not decide a score (the noise seed enters the key resolved, as noise_seed)."""
SCORED_FILES = ("prompts_file", "fid_stats", "inception_weights", "clip_weights")


def evaluation_settings(cfg: Config, num_prompts: int | None = None) -> dict[str, Any]:
    """Everything besides the weights and the noise seed that decides a score, for the key of scores.jsonl."""
    ev = dataclasses.asdict(cfg.eval)
    if num_prompts is not None:
        ev["num_prompts"] = num_prompts
    for name in SETTINGS_NOT_SCORED:
        ev.pop(name, None)
    for name in SCORED_FILES:
        ev[name] = _file_identity(ev[name])
    model = dataclasses.asdict(cfg.model)
    return {"eval": ev, "frozen_checkpoint": _file_identity(model.get("frozen_checkpoint")),
            "model": model, "diffusion": dataclasses.asdict(cfg.diffusion)}


def settings_digest(settings: dict[str, Any]) -> str:
    """A short stable digest of `evaluation_settings` (what scores.jsonl records)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_identity(run_dir: str | os.PathLike, record: dict[str, Any]) -> str:
    """A collected checkpoint's identity for the score key: the sha256 its index line recorded.

    An index written before checksums were recorded: the sha256 of the file itself.
    """
    if "sha256" in record:
        return str(record["sha256"])
    return file_sha256(Path(run_dir) / EVAL_CHECKPOINT_DIR / record["file"])
