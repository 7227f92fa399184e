"""One build of an export at a time, across processes, with a lock file that does not outlive its use.

The lock is an exclusive flock on `PATH`. Removing a lock file is safe only this way round: the holder
unlinks the path while it still holds the lock, then closes it; whoever acquires a lock then checks that
the file it locked is still the one at the path, and starts over if not. So a waiter that was blocked on
the old (now unlinked) file never runs beside a newcomer that created and locked a new file at the path.
Where there is no flock (Windows) filelock does the locking and removes its own file on release.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class BuildLock:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        self.fallback = None
        if fcntl is None:
            from filelock import FileLock

            self.fallback = FileLock(str(self.path))

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting for it when `blocking`); False when another process holds it."""
        if self.fallback is not None:
            from filelock import Timeout

            try:
                self.fallback.acquire(blocking=blocking)
            except Timeout:
                return False
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                self.fd = fd
                return True
            os.close(fd)  # the previous holder removed this file after we opened it: lock the one there now

    def release(self) -> None:
        if self.fallback is not None:
            self.fallback.release()
            return
        self.path.unlink(missing_ok=True)  # while still holding the lock, see the module docstring
        os.close(self.fd)
        self.fd = None
