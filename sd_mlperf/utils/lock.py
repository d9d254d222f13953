"""A lock file that says who holds it (pid, host, since when), and whether a process on this host is alive.

Two `sd-mlperf evaluate --run-dir` on one run directory would both append to its scores.jsonl and both write
its final log. `RunLock` makes the second one stop with the holder's pid and host; a lock whose holder died
(a kill -9 skips the release) is reported as stale with the command that clears it, never taken over silently:
on another host the pid cannot be checked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from sd_mlperf.utils.errors import UserError


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def holder_record() -> dict[str, object]:
    """This process: pid, host and the time, as lock and heartbeat files record it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}


class RunLock:
    """An exclusive lock file (O_CREAT | O_EXCL) holding this process's pid and host; removed on release."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._held = False

    def acquire(self) -> RunLock:
        """Take the lock or raise a UserError naming the holder (and, for a dead holder, how to clear it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise UserError(self._refusal()) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(holder_record()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._held = True
        return self

    def _refusal(self) -> str:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(holder["pid"]), str(holder["host"])
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["time"])))
        except (OSError, ValueError, KeyError, TypeError):
            return (f"{self.path} exists but is unreadable: another {self.what} may be running. If none is, clear "
                    f"it: rm {self.path}")
        if host == socket.gethostname() and not process_alive(pid):
            return (f"stale lock {self.path}: its {self.what} (pid {pid} on {host}, since {since}) is gone. Clear it "
                    f"with: rm {self.path}")
        where = "this host" if host == socket.gethostname() else f"host {host}"
        return (f"another {self.what} holds {self.path} (pid {pid} on {where}, since {since}); two at once would mix "
                f"their results. Wait for it to finish; if it is not running any more, clear it: rm {self.path}")

    def release(self) -> None:
        """Remove the lock file if this object took it."""
        if self._held:
            self._held = False
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
