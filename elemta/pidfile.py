"""<spool_dir>/elemta.pid: the main process's PID, and a lock that keeps a second elemta off
the same spool (as Postfix's master.pid in its queue directory).

The lock is a flock held by the main process for its life, so a PID file left by a killed
elemta is simply taken over: the kernel let go of its lock.  Forked children close their copy
(close_in_child), so a restarted elemta is not kept out by workers still finishing.
"""

from __future__ import annotations

import errno
import fcntl
import os

NAME = "elemta.pid"


class PidFileError(OSError):
    """Another elemta holds the spool, or the PID file cannot be written."""


class PidFile:
    def __init__(self, spool_dir: str):
        self.path = os.path.join(spool_dir, NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PidFileError(errno.EBUSY, f"another elemta (PID {other}) runs on this spool", self.path) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def close_in_child(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Remove the file and let go of the lock (the main process, at its end)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def read_pid(spool_dir: str) -> int | None:
    """The PID of the elemta running on spool_dir, None if none runs (or it cannot be told)."""
    path = os.path.join(spool_dir, NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isascii() and text.isdigit() else None
        return None  # nobody holds it: a file left behind
    finally:
        os.close(fd)
