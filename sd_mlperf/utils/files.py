"""Atomic file writes (a reader never sees a half-written file), write checks and one-line write errors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd_mlperf.utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _errno_in_chain(exc: BaseException) -> int | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def disk_full(exc: BaseException, path: str | os.PathLike) -> bool:
    """Whether writing `path` failed for want of space: ENOSPC/EDQUOT in the error chain, or a full filesystem.

    torch.save reports a failed write as a RuntimeError ("file write failed") that does not say why; then the
    free space of `path`'s filesystem decides.
    """
    code = _errno_in_chain(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def write_error(exc: BaseException, path: str | os.PathLike, what: str) -> Exception:
    """A one-line error for a failed write of `path` (`what` it is): 'No space left on device' when that is why."""
    if disk_full(exc, path):
        return UserError(f"No space left on device: writing {what} {path} failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}). Free space on that filesystem (or move "
                         "run.output_dir) and resume the run.")
    return UserError(f"writing {what} {path} failed: {type(exc).__name__}: {exc}")


def check_writable(folder: str | os.PathLike, purpose: str) -> None:
    """Create and remove a file in `folder` (made if missing): a read-only or full folder fails here, naming it.

    A real write, not os.access: root passes access checks on a read-only mount.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write_check.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"ok\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write into {folder} ({exc.strerror or exc}): {purpose} needs it writable. Make it "
                        "writable (or free space there) and run again.") from exc


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = ".*.tmp") -> list[Path]:
    """Delete what a killed writer left under a temporary name in `folder` (files and directories); return them."""
    folder = Path(folder)
    removed = []
    for path in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (one chunk in memory, not the file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """A binary file wrapper that hashes (sha256) and counts what is written through it (for torch.save)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        """Hash, count and write `data`."""
        self._hash.update(data)
        self.num_bytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        """Flush the file."""
        self._f.flush()

    def hexdigest(self) -> str:
        """sha256 of everything written so far."""
        return self._hash.hexdigest()
