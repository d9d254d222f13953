"""Webdataset tar shards: pattern expansion, a header-only index, member reads and deterministic writes.

A sample is the run of consecutive members sharing a key (`KEY.npy`, `KEY.txt`, ...: the key is the
path up to the first dot of the file name, as webdataset defines it). Loaders work on SampleRefs
(shard, key, member offsets) and read member bytes only when a sample is used, so skipping ahead
on resume reads tar headers only, never sample data.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sd_mlperf.utils.files import atomic_path

_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [out for item in items for out in _expand_braces(head + item + tail)]


def expand_shards(pattern: str, *, must_exist: bool = True) -> list[str]:
    """Shard paths for a folder (its *.tar, sorted), a glob, or a brace pattern like `{00000..00831}.tar`."""
    if os.path.isdir(pattern):
        paths = sorted(str(p) for p in Path(pattern).glob("*.tar"))
    elif any(c in pattern for c in "*?["):
        paths = sorted(glob.glob(pattern))
    else:
        paths = _expand_braces(pattern)
        if must_exist:
            absent = [p for p in paths if not os.path.isfile(p)]
            if absent:
                raise FileNotFoundError(f"{len(absent)} of {len(paths)} shards of '{pattern}' do not exist "
                                        f"(first: {absent[0]}); check the shard pattern.")
    if must_exist and not paths:
        raise FileNotFoundError(f"no .tar shards match '{pattern}'; give a folder of shards, a glob or a brace "
                                f"pattern such as /data/{{00000..00831}}.tar.")
    return paths


def split_key(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.npy` -> (`dir/KEY`, `ext.npy`): the webdataset key/extension rule."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in its shard: extension -> (data offset, size)."""

    shard: str
    key: str
    members: Mapping[str, tuple[int, int]]


@dataclass
class ShardIndex:
    """All samples of one shard found by a header scan; `truncated` says the tar ends early."""

    shard: str
    samples: list[SampleRef] = field(default_factory=list)
    truncated: bool = False
    error: str = ""


def index_shard(path: str) -> ShardIndex:
    """Scan a tar's headers (seeking over data) and group members into samples by key."""
    index = ShardIndex(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")  # noqa: SIM115 - closed below; tarfile needs the seekable object
    except OSError as exc:
        index.error = f"cannot open: {exc}"
        return index
    members: list[tuple[str, int, int]] = []
    end = 0
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - f is closed by the with above
            while True:
                info = tf.next()
                if info is None:
                    break
                if info.isfile():
                    members.append((info.name, info.offset_data, info.size))
                end = info.offset_data + ((info.size + 511) // 512) * 512
        except (tarfile.ReadError, EOFError) as exc:
            index.truncated = True
            index.error = str(exc)
    # tarfile stops silently on some truncations; a complete tar has data for every member and
    # at least one zero block (its end marker) after the last one.
    if members and (members[-1][1] + members[-1][2] > size or size - end < 512):
        index.truncated = True
    for key, group in itertools.groupby(members, key=lambda m: split_key(m[0])[0]):
        group = list(group)
        if any(offset + nbytes > size for _, offset, nbytes in group):
            continue  # a sample cut by truncation is incomplete: drop it (the shard counts as truncated)
        index.samples.append(SampleRef(path, key, {split_key(name)[1]: (o, n) for name, o, n in group}))
    return index


class ShardReader:
    """Reads member bytes by offset, keeping a few shard files open (an LRU of handles)."""

    def __init__(self, max_open: int = 4) -> None:
        self.max_open = max_open
        self._files: dict[str, io.BufferedReader] = {}

    def read(self, ref: SampleRef, ext: str) -> bytes:
        """The bytes of `ref`'s member with extension `ext` (KeyError if it has none)."""
        offset, size = ref.members[ext]
        f = self._files.pop(ref.shard, None)
        if f is None:
            f = open(ref.shard, "rb")  # noqa: SIM115 - cached, closed in close()
            if len(self._files) >= self.max_open:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
        self._files[ref.shard] = f  # most recently used last
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"{ref.shard}: member {ref.key}.{ext} is cut short")
        return data

    def close(self) -> None:
        """Close every open shard."""
        for f in self._files.values():
            f.close()
        self._files.clear()


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write (key, {ext: bytes}) samples as a tar atomically; fixed metadata makes equal input give equal bytes."""
    n = 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for key, parts in samples:
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uname = info.gname = ""
                    tf.addfile(info, io.BytesIO(data))
                n += 1
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; shards are shared data
    return n
