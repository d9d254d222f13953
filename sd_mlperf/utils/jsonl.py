"""JSON-lines files that a kill can cut: appends that never fuse two records, reads that name the bad line.

A writer killed mid-append leaves a last line without its newline (a torn line). Appending after it would
glue the next record onto the torn one, and both would be lost (or, worse, one would read as the other).
`append_jsonl` therefore repairs the tail first: it truncates the file after its last newline (the torn
record never was complete) and then appends one whole line, flushed and fsynced. Readers skip a torn last
line (the writer may be writing it right now) and raise on any other line that is not JSON, naming the file
and the line number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sd_mlperf.utils.errors import UserError

_TAIL_CHUNK = 1 << 16


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut a last line that lacks its newline (left by a killed writer); return the bytes removed (0: none)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        end = size  # search backwards for the last newline
        keep = 0
        while end > 0:
            start = max(end - _TAIL_CHUNK, 0)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as one line (the torn tail of a killed writer repaired first), flushed and fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_torn_tail(path)
    line = json.dumps(dict(record), allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a JSON-lines file ([] if it does not exist); a torn last line is left out.

    Any other line that is not a JSON object raises a UserError naming the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        if not line.endswith("\n"):
            break  # torn (or being written): complete at the next read, or cut by the next append
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not a JSON record ({exc.msg}). The file was edited or damaged: "
                            "restore it, or delete that line (its record is then missing).") from exc
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: a JSON {type(record).__name__}, not a record (an object). Restore "
                            "the file or delete that line.")
        records.append(record)
    return records
