"""One run per folder: a lock file that names the run holding it.

``RUN_DIR/run.lock`` holds an exclusive ``fcntl.flock`` for as long as the run lives (the
kernel drops it when the process dies, however it dies) and, as JSON, who holds it: pid,
host, start time and command. A second run into the same folder is refused with a message
naming the first; a lock file still naming a process that died without releasing it is
taken over. The file is never deleted (deleting a lock file lets two processes lock two
different files): releasing empties it, so a file with content and no lock means the
previous run was killed.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     lock = RunLock(folder).acquire()
...     lock.release()
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .checkpoint_files import CheckpointError

__all__ = ["RunLock", "RunLockError", "LOCK_FILE", "lock_holder"]

LOCK_FILE = "run.lock"

# Locks this process holds, by lock file: a second engine of the same process (a user's
# loop, a test) reuses the lock instead of refusing itself (flock is per open file).
_HELD: dict[str, "RunLock"] = {}


class RunLockError(CheckpointError):
    """The run folder is in use by another run."""


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
    except ValueError:
        return {"unreadable": raw[:200].decode("utf-8", "replace")}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info or "pid" not in info:
        return "another process"
    command = str(info.get("command", ""))
    command = command if len(command) <= 200 else command[:197] + "..."
    return (
        f"pid {info['pid']} on {info.get('host', '?')} since {info.get('started', '?')}"
        + (f" ({command})" if command else "")
    )


def lock_holder(folder: str | Path) -> dict[str, Any] | None:
    """What the lock file of ``folder`` says about its holder (``None``: no file or empty)."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read(fd) or None
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run folder; :meth:`acquire` it at the start of a run, :meth:`release` at the end.

    Args:
        folder: the run folder (created if missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.took_over: dict[str, Any] | None = None  # the info of a killed holder, when taken over
        self._fd: int | None = None
        self._count = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the folder or raise :class:`RunLockError` naming the run that has it.

        Returns the lock that holds the folder (this one, or the one this process already holds).
        """
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        mine = _HELD.get(key)
        if mine is not None:
            mine._count += 1
            return mine
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise RunLockError(
                f"run folder {self.folder} is in use by {_describe(info)}; wait for that run to end "
                f"or choose another run folder (--run-dir)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read(fd)
        self.took_over = previous if previous.get("pid") is not None else None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.info = info
        self._fd, self._count = fd, 1
        _HELD[key] = self
        return self

    def takeover_message(self) -> str | None:
        """One line saying whose stale lock was taken over, or ``None``."""
        if not self.took_over:
            return None
        return f"run folder {self.folder}: took over the lock of {_describe(self.took_over)}, which ended without releasing it"

    def release(self) -> None:
        """Give the folder back (empties the lock file; it stays, see the module doc)."""
        if self._fd is None:
            return
        self._count -= 1
        if self._count > 0:
            return
        import fcntl

        fd, self._fd = self._fd, None
        _HELD.pop(str(self.path.resolve()), None)
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
