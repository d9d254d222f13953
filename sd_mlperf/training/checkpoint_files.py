"""The files of a resumable checkpoint: written fsynced with their sha256 beside them, read back only if they match.

`save_file` hashes what torch.save writes as it goes (no second read) and records it in `NAME.pt.sha256`, in
`sha256sum -c` format; `load_file` refuses a file that differs from its record (damage after the write, which
may still parse), naming the file and the fix. A file without a record (written before checksums) loads unchecked.
Verifying reads the file once more before torch.load reads it (about 1.2 s per GB here): a resume only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.files import HashingWriter, file_sha256, write_error


def checksum_file(path: str | os.PathLike) -> Path:
    """The sidecar holding `path`'s sha256, in `sha256sum -c` format."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_hashed(obj: Any, path: str | os.PathLike) -> HashingWriter:
    """torch.save `obj` to `path`, fsynced, hashing as it writes (no second read): the writer has sha256 and size."""
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer


def save_file(obj: Any, path: Path) -> None:
    """torch.save to `path`, fsynced, and its sha256 (hashed while writing: no second read) beside it."""
    try:
        writer = save_hashed(obj, path)
        with open(checksum_file(path), "w", encoding="utf-8") as f:
            f.write(f"{writer.hexdigest()}  {path.name}\n")
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:  # a full disk says so, naming the file
        raise write_error(exc, path, "checkpoint file") from exc


def verify_checksum(path: Path) -> None:
    """Refuse `path` if it differs from its recorded sha256; a file without a record (older checkpoints) passes."""
    sidecar = checksum_file(path)
    if not sidecar.is_file():
        return
    try:
        expected = sidecar.read_text(encoding="utf-8").split()[0].lower()
        actual = file_sha256(path)
    except (OSError, UnicodeDecodeError, IndexError) as exc:  # EIO included: a resume=auto falls back on it
        raise UserError(f"cannot check checkpoint file {path} against {sidecar.name}: {exc}. Delete that "
                        "checkpoint directory or set training.resume=never (or to another checkpoint path).") from exc
    if actual != expected:
        raise UserError(f"checkpoint file {path} does not match its sha256 in {sidecar.name}: it was damaged after "
                        f"it was written. Delete {path.parent} or set training.resume=never (or to another "
                        f"checkpoint path); if you changed the file on purpose, delete {sidecar.name} (it is then "
                        "read unchecked).")


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: renames, new files), where the filesystem allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_file(path: str | os.PathLike, *, verify: bool = True) -> Any:
    """torch.load with weights_only=True after its checksum (`verify=False`: checked already); a broken or damaged
    file is named in the error."""
    if verify:
        verify_checksum(Path(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint file {path}: {exc}. Delete that checkpoint directory "
                        "or set training.resume=never (or to another checkpoint path).") from exc
