"""Whether the queue may take new mail: queue.min_free_space, queue.max_messages and
queue.max_bytes, asked at every MAIL (452 4.3.1 when not) and, for the disk, again just before
each commit, when the messages in transfer are here and MAIL's answer may be stale.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from elemta.errors import QueueError

CACHE_SECONDS = 1.0  # how long the queue's own count of undelivered mail is reused
ROW_OVERHEAD = 8192  # octets a message adds beyond its body: rows, index entries, WAL frame headers


@dataclass(frozen=True)
class _Snapshot:
    """The undelivered totals last counted, and the writer's own totals at that moment."""

    taken_at: float
    messages: int
    bytes: int
    committed_messages: int
    committed_bytes: int


class IntakeLimits:
    """The limits of one queue database.

    committed() gives the (messages, bytes) this process has committed so far, and
    count_undelivered() the queue's (messages, bytes) not yet delivered (a read of the database).
    Between two counts, a second apart at most, the commits since the last count are added,
    so a burst inside the window still meets the quota.
    """

    def __init__(self, path: str, *, min_free_bytes: int, max_messages: int, max_bytes: int,
                 clock: Callable[[], float], committed: Callable[[], tuple[int, int]],
                 count_undelivered: Callable[[], tuple[int, int]]) -> None:
        self.path = path
        self._clock = clock
        self._committed = committed
        self._count_undelivered = count_undelivered
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self.set(min_free_bytes=min_free_bytes, max_messages=max_messages, max_bytes=max_bytes)

    def set(self, *, min_free_bytes: int, max_messages: int, max_bytes: int) -> None:
        """New limits (a config reload); they apply from the next check."""
        self.min_free_bytes = min_free_bytes
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._snapshot = None

    def forget(self) -> None:
        """Count again at the next check (the database just said it is full)."""
        self._snapshot = None

    def check(self) -> str | None:
        """None if new mail may be accepted, else 'disk' or 'quota'."""
        if not (self.min_free_bytes or self.max_messages or self.max_bytes):
            return None
        # The file system's free space itself, at every MAIL (a statvfs costs a microsecond):
        # the WAL, checkpoints and other writers use the disk too, not only our messages.
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            return "disk"
        if not (self.max_messages or self.max_bytes):
            return None
        snap = self._fresh_snapshot()
        messages, nbytes = self._committed()
        # A commit racing the count may be counted twice until the next one, which errs on the
        # side of refusing.
        if self.max_messages and snap.messages + messages - snap.committed_messages >= self.max_messages:
            return "quota"
        if self.max_bytes and snap.bytes + nbytes - snap.committed_bytes >= self.max_bytes:
            return "quota"
        return None

    def room(self) -> int | None:
        """The octets new mail may still take above min_free_space (negative: none), or None
        when there is no such limit or the file system cannot say (SQLITE_FULL then decides)."""
        if not self.min_free_bytes:
            return None
        try:
            return self.free_bytes() - self.min_free_bytes
        except QueueError:
            return None

    @staticmethod
    def need(body_size: int) -> int:
        """The octets one message takes until the next checkpoint: it is written to the WAL
        and then into the database, so its size twice, plus a page or two of index and row."""
        return 2 * body_size + ROW_OVERHEAD

    def free_bytes(self) -> int:
        """The space new mail may use: the file system's free space (what an unprivileged
        writer may use), less the WAL's size, since what the WAL holds is copied into the
        database by a checkpoint that may not have run yet (it grows queue.db by up to that)."""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            raise QueueError(f"cannot check free space for {self.path}: {exc}") from exc
        try:
            wal = os.stat(self.path + "-wal").st_size
        except OSError:
            wal = 0
        return st.f_bavail * st.f_frsize - wal

    def _fresh_snapshot(self) -> _Snapshot:
        def fresh(snap: _Snapshot | None, now: float) -> bool:
            # A clock that stepped back also counts as stale.
            return snap is not None and 0 <= now - snap.taken_at < CACHE_SECONDS

        snap = self._snapshot
        if fresh(snap, self._clock()):
            return snap  # type: ignore[return-value]
        with self._lock:  # one counter; the others wait and reuse its result
            now = self._clock()
            snap = self._snapshot
            if fresh(snap, now):
                return snap  # type: ignore[return-value]
            committed_messages, committed_bytes = self._committed()
            messages, nbytes = self._count_undelivered()
            snap = _Snapshot(now, messages, nbytes, committed_messages, committed_bytes)
            self._snapshot = snap
            return snap
