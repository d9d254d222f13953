"""Checkpoints: atomic save, keep the last N, `resume=auto`, RNG capture, weights-only ldm export.

Layout of `run_dir/checkpoints/`:

    step_0000010/
      model.pt               {"unet": state_dict, "step", "samples_count", "world_size", "format"}  (rank 0)
      optimizer.pt           dp.state_dict(): AdamW state gathered to rank 0 + loss scaler (rank 0;
                             absent with checkpoint.save_optimizer=false)
      rank_00000.pt          per rank: {"rng": every RNG state, "data": loader position, "run_seed",
      rank_00001.pt ...                 "lr_schedule": next step and lr, "reached_target"}
      unet_ldm.safetensors   optional, `model.diffusion_model.*` names (checkpoint.export_ldm_weights)
      *.pt.sha256            each .pt file's sha256 (`sha256sum -c` format), hashed as it was written
    latest                   text file holding the newest complete step directory name

The optimizer state is gathered: the data-parallel backends consolidate their shards on rank 0
(sd_mlperf.parallel.data_parallel), and on resume every rank reads that one file and keeps its own
shard. RNG states and data positions differ per rank, so each rank writes its own small file;
resuming therefore needs the same world size (the check says so). `model.pt` alone (or the ldm
export) is enough to evaluate or to start a new run.
Every directory is written as `.step_XXXXXXX.tmp` and renamed only when all ranks have finished, and
`latest` is replaced atomically, so a crash never leaves a half-written checkpoint under a real name.
Every .pt file is read back only if it matches its recorded sha256 (damage after the write, which may still
parse, is refused naming the file); a file without one (written before checksums) loads unchecked.
`read_checkpoint_weights` answers, for `sd-mlperf evaluate --checkpoint`, every question about a path into this
layout (or an ldm export anywhere): its weights, step, samples_count and run directory.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_mlperf.config.schema import CheckpointConfig
from sd_mlperf.training.checkpoint_files import fsync_dir, load_file, save_file, verify_checksum
from sd_mlperf.training.eval_checkpoints import EVAL_CHECKPOINT_DIR, load_eval_checkpoint, read_index
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.files import atomic_write_text, remove_stale_temporaries, write_error
from sd_mlperf.utils.logging import logger

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
LATEST_FILE = "latest"
LDM_EXPORT_FILE = "unet_ldm.safetensors"
_STEP_DIR_RE = re.compile(r"^step_(\d{7,})$")  # the package's one step-directory pattern: step_dir_name's names


def step_dir_name(step: int) -> str:
    """`step_0000010` for step 10."""
    return f"step_{step:07d}"


def step_of_dir_name(name: str) -> int | None:
    """10 for `step_0000010`; None for a name `step_dir_name` never makes."""
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def rank_file_name(rank: int) -> str:
    """`rank_00003.pt` for rank 3."""
    return f"rank_{rank:05d}.pt"


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the run draws from: torch CPU/CUDA, python, numpy and the trainer's generator."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy arrays are not allowed by torch.load(weights_only=True): store the key as a tensor.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["generator"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def saved_global_batch_size(model: Mapping[str, Any]) -> int | None:
    """The global batch a checkpoint's model payload trained with; None if it cannot tell.

    Recorded as `global_batch_size`; older checkpoints lack it, and there samples_count = step x batch.
    """
    if model.get("global_batch_size") is not None:
        return int(model["global_batch_size"])
    batch, rest = divmod(int(model["samples_count"]), max(int(model["step"]), 1))
    return None if rest else batch


def saved_run_seed(path: str | os.PathLike) -> int | None:
    """The run seed a checkpoint directory recorded (rank 0's file), or None for checkpoints older than that."""
    seed = load_file(Path(path) / rank_file_name(0)).get("run_seed")
    return None if seed is None else int(seed)


class Checkpointer:
    """Saves and finds checkpoints of one run; every rank calls every method (collective via `barrier`)."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier or (lambda: None)
        self._verified: set[Path] = set()
        """Files `intact` hashed and found matching: `load` reads them without hashing them again."""

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int, samples_count: int, *, unet_state: Mapping[str, torch.Tensor],
             optimizer_state: Mapping[str, Any] | None, rank_state: Mapping[str, Any],
             global_batch_size: int | None = None) -> Path:
        """Write `step_XXXXXXX/` atomically (all ranks), point `latest` at it, prune old ones; return its path."""
        name = step_dir_name(step)
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        if self.rank == 0:
            if tmp.exists():  # left by a crash during an earlier save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        try:
            self._write(tmp, step, samples_count, unet_state=unet_state, optimizer_state=optimizer_state,
                        rank_state=rank_state, global_batch_size=global_batch_size)
        except BaseException:  # Ctrl-C or a full disk: abandon the save cleanly (no temporary left behind)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier()
        if self.rank == 0:
            self._publish(tmp, final)
            self._prune()
        self.barrier()
        logger.info("saved checkpoint %s (step %d, %d samples)", final, step, samples_count)
        return final

    def _write(self, tmp: Path, step: int, samples_count: int, *, unet_state: Mapping[str, torch.Tensor],
               optimizer_state: Mapping[str, Any] | None, rank_state: Mapping[str, Any],
               global_batch_size: int | None) -> None:
        save_file({**rank_state, "step": step, "samples_count": samples_count, "rank": self.rank,
                   "world_size": self.world_size}, tmp / rank_file_name(self.rank))
        if self.rank != 0:
            return
        cpu_state = {k: v.detach().cpu() for k, v in unet_state.items()}
        save_file({"unet": cpu_state, "step": step, "samples_count": samples_count, "world_size": self.world_size,
                   "global_batch_size": global_batch_size, "format": FORMAT}, tmp / MODEL_FILE)
        if self.cfg.save_optimizer and optimizer_state is not None:
            save_file(dict(optimizer_state), tmp / OPTIMIZER_FILE)
        if self.cfg.export_ldm_weights:
            from sd_mlperf.models.checkpoint_io import export_unet_ldm

            try:
                export_unet_ldm(cpu_state, tmp / LDM_EXPORT_FILE)
            except Exception as exc:  # a full disk says so, naming the file
                raise write_error(exc, tmp / LDM_EXPORT_FILE, "checkpoint file") from exc

    def _publish(self, tmp: Path, final: Path) -> None:
        fsync_dir(tmp)
        old = final.with_name(f".{final.name}.old")
        if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old one
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        fsync_dir(self.dir)
        atomic_write_text(self.dir / LATEST_FILE, final.name + "\n")
        if old.exists():
            shutil.rmtree(old)

    def recover(self) -> None:
        """Rank 0, before training: undo what a kill during a save left (temporary and swapped-out directories).

        A kill between the two renames of `_publish` leaves a step only as `.step_X.old`: it is put back.
        """
        if self.rank != 0 or not self.dir.is_dir():
            return
        for old in sorted(self.dir.glob(".step_*.old")):
            final = self.dir / old.name[1:-len(".old")]
            if not final.exists() and step_of_dir_name(final.name) is not None:
                old.rename(final)
                logger.warning("restored %s from %s (a kill interrupted its replacement)", final, old)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in remove_stale_temporaries(self.dir):  # .step_X.tmp directories, .latest.*.tmp files
            logger.warning("removed %s, left by a checkpoint save that a kill interrupted", tmp)

    def _prune(self) -> None:
        complete = self.list_complete()
        for path in complete[: max(len(complete) - self.cfg.keep_last, 0)]:
            shutil.rmtree(path)
            logger.debug("removed old checkpoint %s", path)

    # -- finding and loading ---------------------------------------------------------------------------
    def is_complete(self, path: Path) -> bool:
        """A step directory with the model file and one file per rank of the world size that wrote it.

        Judged by the writer's world size, not this run's: a checkpoint of another size is complete and
        `load` then refuses it with the reason (or reshards it), where a resume would otherwise skip it
        and silently start over.
        """
        if not (path / MODEL_FILE).is_file() or not (path / rank_file_name(0)).is_file():
            return False
        try:
            saved_world = int(self._load_file(path / rank_file_name(0))["world_size"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # load_file: RuntimeError naming the file
            logger.warning("checkpoint %s is not usable (%s); looking for an older one", path, exc)
            return False
        return all((path / rank_file_name(r)).is_file() for r in range(saved_world))

    def list_complete(self) -> list[Path]:
        """Published checkpoints, oldest first (directories under a temporary name are ignored)."""
        if not self.dir.is_dir():
            return []
        found = [(step, p) for p in self.dir.iterdir() if p.is_dir() and (step := step_of_dir_name(p.name)) is not None]
        return [p for _, p in sorted(found) if (p / MODEL_FILE).is_file()]

    def intact(self, path: Path) -> bool:
        """Whether every .pt file of `path` matches its recorded sha256 (each rank checks all of them, so all
        ranks decide alike); the files that pass are not hashed again by `load`."""
        for file in sorted(path.glob("*.pt")):
            if file in self._verified:
                continue
            try:
                verify_checksum(file)
            except RuntimeError as exc:  # UserError naming the file
                logger.warning("checkpoint %s is not usable (%s); looking for an older one", path, exc)
                return False
            self._verified.add(file)
        return True

    def latest(self, *, verify: bool = False) -> Path | None:
        """The checkpoint `latest` names if it is complete, else the newest complete one; with `verify`, the newest
        one that is also `intact` (what resume=auto takes: a damaged file sends it to an older checkpoint)."""
        def usable(path: Path) -> bool:
            return self.is_complete(path) and (not verify or self.intact(path))

        pointer = self.dir / LATEST_FILE
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if step_of_dir_name(candidate.name) is not None and usable(candidate):
                return candidate
            logger.warning("%s names %s, which is not a complete checkpoint; using the newest complete one",
                           pointer, candidate.name)
        return next((p for p in reversed(self.list_complete()) if usable(p)), None)

    def resolve(self, resume: str) -> Path | None:
        """`training.resume`: `auto` (newest complete, or None), `never` (None) or a checkpoint directory."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest(verify=True)
        path = Path(resume)
        if not (path / MODEL_FILE).is_file():
            raise ValueError(f"invalid value for 'training.resume': {resume!r} is not a checkpoint directory "
                             f"(no {MODEL_FILE} in it); use auto, never or a {self.dir}/step_XXXXXXX path.")
        return path

    def load(self, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
        """(model payload, optimizer state or None, this rank's payload) of a checkpoint.

        When the checkpoint was written by another number of ranks and `checkpoint.allow_reshard` lets
        this run resume it anyway, the rank payload is rank 0's: only its run-wide entries (e.g.
        `reached_target`) apply, not its RNG states or data position.
        """
        path = Path(path)
        model = self._load_file(path / MODEL_FILE)
        saved_world = int(model.get("world_size", 1))
        if saved_world != self.world_size and not self.cfg.allow_reshard:
            raise ValueError(
                f"checkpoint {path} was written by {saved_world} ranks and this run has {self.world_size}: "
                f"RNG states and data positions are saved per rank. Run with {saved_world} ranks, or set "
                "checkpoint.allow_reshard=true (parallel.backend=torch; weights, AdamW state, step and samples "
                "carry over, the RNG and data streams restart), or set training.resume=never and load "
                f"{path / MODEL_FILE} as initial weights instead.")
        optimizer_path = path / OPTIMIZER_FILE
        optimizer = self._load_file(optimizer_path) if optimizer_path.is_file() else None
        rank_path = path / rank_file_name(self.rank if saved_world == self.world_size else 0)
        if not rank_path.is_file():
            raise UserError(f"checkpoint {path} lacks {rank_path.name}; it is incomplete. Delete it or set "
                               "training.resume to another checkpoint.")
        return model, optimizer, self._load_file(rank_path)

    def _load_file(self, path: Path) -> Any:
        payload = load_file(path, verify=path not in self._verified)
        self._verified.add(path)  # it matched its sha256 (or has none): not hashed again
        return payload


# -- reading weights for evaluation -----------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointWeights:
    """UNet weights read from a checkpoint path, with what the file and its place in the layout tell."""

    path: Path
    """The weights file: a step directory's model.pt or an ldm export (.safetensors/.ckpt)."""
    state: dict[str, torch.Tensor]
    step: int
    """The recorded step; else the one its step directory names; else 0."""
    samples_count: int | None
    """The recorded samples_count; else the caller's default (None: unknown)."""
    run_dir: Path | None
    """RUN for RUN/checkpoints/step_XXXXXXX/FILE; None for a file outside that layout."""


def checkpoint_run_dir(weights_file: str | os.PathLike) -> Path | None:
    """RUN for a file RUN/checkpoints/step_XXXXXXX/FILE or a collected RUN/eval_checkpoints/step_XXXXXXX.pt; None
    for a file anywhere else."""
    path = Path(weights_file)
    if is_collected_checkpoint(path):
        return path.parents[1]
    if step_of_dir_name(path.parent.name) is None or path.parent.parent.name != CHECKPOINT_DIR:
        return None
    return path.parents[2]


def is_collected_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a weights-only checkpoint collected for offline evaluation (RUN/eval_checkpoints/step_X.pt)."""
    path = Path(path)
    return (path.parent.name == EVAL_CHECKPOINT_DIR and path.suffix == ".pt"
            and step_of_dir_name(path.stem) is not None)


def checkpoint_weights_file(path: str | os.PathLike) -> Path:
    """The weights file a checkpoint path names (a step directory's model.pt, or the file itself), checked to exist."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{path} is a directory without {MODEL_FILE}; pass a trainer checkpoint "
                                    f"directory (RUN_DIR/{CHECKPOINT_DIR}/step_XXXXXXX) or a weights file")
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def _load_collected(path: Path) -> Any:
    """A collected checkpoint's payload, verified against its index line when the index has one."""
    run_dir = path.parents[1]
    record = next((r for r in read_index(run_dir)[0] if r.get("file") == path.name), None)
    return load_file(path) if record is None else load_eval_checkpoint(run_dir, record)


def read_checkpoint_weights(path: str | os.PathLike, samples_count: int | None = None) -> CheckpointWeights:
    """The UNet weights of a step directory, its model.pt, or an ldm UNet export.

    `samples_count` stands in when the file does not record one (an ldm export).
    """
    from sd_mlperf.models.checkpoint_io import load_unet_state_dict

    path = checkpoint_weights_file(path)
    step, count = None, samples_count
    if path.name == MODEL_FILE or is_collected_checkpoint(path):
        payload = _load_collected(path) if is_collected_checkpoint(path) else load_file(path)
        if not isinstance(payload, dict) or "unet" not in payload:
            raise ValueError(f"{path}: not a trainer checkpoint (no 'unet' entry); pass an ldm export instead")
        state, step = payload["unet"], int(payload.get("step", 0))
        count = int(payload["samples_count"]) if "samples_count" in payload else count
    else:
        state = load_unet_state_dict(path)
    if step is None:
        step = step_of_dir_name(path.parent.name)
    return CheckpointWeights(path=path, state=state, step=step or 0, samples_count=count,
                             run_dir=checkpoint_run_dir(path))
