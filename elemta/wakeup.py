"""A wake-up a signal handler may give safely: a byte written to a pipe.

Python runs signal handlers in the main thread between bytecodes, possibly while that same
thread holds a lock, so a handler that takes a lock (threading.Event.set() does) can wait on
itself forever; the signal module's documentation warns against it. A handler here only sets
a flag and writes one byte with os.write, which takes no lock; the main loop sleeps in
select() on the other end, with a timeout, and reads the flags when it wakes.
"""

from __future__ import annotations

import os
import select


def poke(fd: int) -> None:
    """Write one wake-up byte to a non-blocking pipe; a full pipe already means "wake up"."""
    try:
        os.write(fd, b"!")
    except (BlockingIOError, BrokenPipeError):
        pass  # full: a wake-up is pending anyway; gone: the reader polls on its own


class Wakeup:
    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def poke(self) -> None:
        """Safe in a signal handler and from any thread."""
        poke(self._write)

    def wait(self, timeout: float) -> bool:
        """Sleep until poked or timeout seconds passed; True if poked. Pokes are merged."""
        try:
            readable, _, _ = select.select([self._read], [], [], timeout)
        except InterruptedError:  # only without PEP 475's retry; a handler ran: look now
            return True
        if not readable:
            return False
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
