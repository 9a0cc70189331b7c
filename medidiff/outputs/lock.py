"""The run-folder lock: one run at a time writes into an output folder.

``RunLock(folder)`` creates ``<folder>/.medidiff.lock`` with ``O_CREAT | O_EXCL`` (atomic on local and
NFSv3+ file systems) holding the holder's PID, host name, start time and command line. A second run on
the same folder is refused with a message naming the holder. A lock left behind by a process that no
longer runs on this host (killed, crashed) is stale: it is taken over, with a warning. The lock is
re-entrant within one process (a run's folder setup and the task's batch loop both take it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from medidiff.errors import DataError

__all__ = ["LOCK_NAME", "RunLock", "lock_holder"]

LOCK_NAME = ".medidiff.lock"

log = logging.getLogger("medidiff.outputs")

#: Locks this process holds: resolved path -> nesting depth.
_HELD: dict[Path, int] = {}


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """The holder recorded in a folder's lock file (``pid``, ``host``, ``start``, ``command``), or ``None``."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown process (the lock file is unreadable)"
    return (f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('start')} "
            f"({holder.get('command', '')[:120]})")


class RunLock:
    """An exclusive, re-entrant lock on a run's output folder (a context manager).

    Args:
        folder: the output folder (created if needed).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME

    def _key(self) -> Path:
        return self.path.resolve()

    def _create(self) -> bool:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "start": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return True

    def acquire(self) -> RunLock:
        """Take the lock (or deepen this process's hold on it).

        Raises:
            DataError: another live process (or one on another host) holds it.
        """
        key = self._key()
        if _HELD.get(key):
            _HELD[key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                _HELD[self._key()] = 1
                return self
            holder = lock_holder(self.folder)
            here = holder is not None and holder.get("host") == socket.gethostname()
            if holder is None or not here or _alive(int(holder.get("pid", -1))):
                if holder is None and not self.path.exists():
                    continue  # released meanwhile
                raise DataError(f"another run is writing into this folder: {_describe(holder)}", where=self.folder,
                                fix="wait for it to end, or choose another --out; if that run is dead (e.g. on "
                                    f"another machine), delete {self.path}.")
            log.warning("%s: taking over the stale lock of a run that no longer exists (%s)", self.folder,
                        _describe(holder))
            self.path.unlink(missing_ok=True)
        raise DataError("could not take the run-folder lock", where=self.path, fix="try again.")

    def release(self) -> None:
        """Give the lock up (the file is removed when the outermost hold ends)."""
        key = self._key()
        depth = _HELD.get(key, 0)
        if depth > 1:
            _HELD[key] = depth - 1
            return
        _HELD.pop(key, None)
        holder = lock_holder(self.folder)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
