"""The scheduler thread's sleep: until another thread wakes it, the SMTP workers' wake pipe has
bytes, or a timeout."""

from __future__ import annotations

import contextlib
import os
import select
import threading


class Wake:
    """threading.Event's set, wait and clear in one, that can also watch a pipe.  What woke
    it is read away, so the next wait sleeps again."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()  # set() against close(): a closed number may be reused
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def watch(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._poll.register(fd, select.POLLIN)

    def set(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def wait(self, timeout: float) -> bool:
        """Sleep until woken (True) or timeout seconds have passed (False)."""
        ready = self._poll.poll(timeout * 1000)
        for fd, _ in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):  # an eventfd's counter, or the pipe's bytes
                    pass
        return bool(ready)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
            self._fd = -1
