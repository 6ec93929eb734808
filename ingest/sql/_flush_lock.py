"""FlushLock: on SQLite, the one process of those sharing a database file that flushes."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["FlushLock"]


class FlushLock:
    """An exclusive `flock` on a file next to the database, taken without waiting.

    SQLite has no row locks for a claim to hold across processes, so one process holds
    all of them: the one holding this lock. The others ask again on each claim and take
    over once the holder is gone (the kernel drops a dead process's locks). `path` None
    (an in-memory database, which no other process can open) needs no lock.

    The lock belongs to the open file, so it is this object's, not the process's: a
    second store in the same process does not get it either, and a child forked without
    exec would share it (the file is not inherited across exec)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None

    def held(self) -> bool:
        """Whether this store may flush: true once the lock is taken, here or before."""
        if self.path is None or self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Let another process flush (closing the file drops the lock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
