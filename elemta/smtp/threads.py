"""Session threads that are reused: a thread per connection, without a new thread each time.

Starting a thread costs a clone(), a stack mapping and, at its end, an exit and an unmap;
with short SMTP sessions that was a noticeable part of what a connection cost. Here a thread
that finished a session waits up to `idle_timeout` seconds for the next one. No connection
ever waits for a thread: when none is idle, a new one starts (the connection caps bound how
many run), so this is not a bounded pool that could queue clients behind slow sessions.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_CLOSE = None  # put for an idle thread: end now


class SessionThreads:
    # After a flood of 1,000 slow sessions, 256 kept threads (8 MiB of stack address space and
    # a kernel task each) stayed for half a minute; 64 covers a busy server's churn.
    def __init__(self, name: str = "session", idle_timeout: float = 15.0, max_idle: int = 64):
        self.name = name
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle  # threads kept waiting beyond this many end at once
        self._lock = threading.Lock()
        # Waiting threads not yet promised a job. Each submit that finds one decrements it and
        # puts exactly one job, so the queue never holds more jobs than there are waiters.
        self._idle = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._serial = 0

    def submit(self, fn: Callable[..., None], *args) -> None:
        """Run fn(*args) on an idle thread, or on a new one if none is idle."""
        with self._lock:
            if self._idle and not self._closed:
                self._idle -= 1
                self._jobs.put((fn, args))
                return
            self._serial += 1
            name = f"{self.name}-{self._serial}"
        threading.Thread(target=self._run, args=((fn, args),), name=name, daemon=True).start()

    def close(self) -> None:
        """End the idle threads; running sessions end on their own (their threads then exit)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(_CLOSE)

    def idle(self) -> int:
        with self._lock:
            return self._idle

    def _run(self, job) -> None:
        while job is not _CLOSE:
            fn, args = job
            fn(*args)  # the caller's function handles its own errors (threaded.serve does)
            job = fn = args = None  # drop references to the finished session
            with self._lock:
                if self._closed or self._idle >= self.max_idle:
                    return
                self._idle += 1
            job = self._next()

    def _next(self):
        try:
            return self._jobs.get(timeout=self.idle_timeout)
        except queue.Empty:
            pass
        with self._lock:
            if self._idle:  # nobody promised us a job: leave
                self._idle -= 1
                return _CLOSE
        # Every waiter was promised a job, ours included, between the timeout and the lock.
        return self._jobs.get()
