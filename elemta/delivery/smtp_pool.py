"""Connection caching for the outbound client: idle sessions kept per next hop.

Knows a connection only by what it asks of it (Pooled), so it does not import the client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar


class Pooled(Protocol):
    """What the pool needs of a connection (smtp_client.SmtpConnection)."""

    messages_sent: int

    def usable(self, probe: bool = True) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Pooled)


class Pool(Generic[C]):
    """Idle connections kept for reuse per next hop: several transactions in one session
    (RFC 5321 §3.3) save the connect, EHLO and TLS handshake."""

    def __init__(self, *, idle_timeout: float = 10.0, max_messages: int = 100,
                 max_idle: int = 100, clock: Callable[[], float] = time.monotonic):
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.max_idle = max_idle
        self._clock = clock
        self._idle: dict[Hashable, list[tuple[float, C]]] = {}
        self._stale: list[C] = []  # found by get(), closed by the next close_idle()
        self._lock = threading.Lock()  # workers share the pool
        self._counts = {"reused": 0, "kept": 0, "closed": 0}

    def get(self, key: Hashable) -> C | None:
        """An idle usable connection for key, newest first.  Expired and broken ones are taken
        out and closed by the next close_idle(), not here: QUIT waits for the server, and the
        caller may be the delivery loop."""
        found = None
        with self._lock:
            entries = self._idle.get(key, [])
            while entries and found is None:
                since, conn = entries.pop()
                if self._clock() - since <= self.idle_timeout and conn.usable():
                    found = conn
                    self._counts["reused"] += 1
                else:
                    self._stale.append(conn)
            if not entries:
                self._idle.pop(key, None)
        return found

    def put(self, key: Hashable, conn: C) -> None:
        """Give a connection back after send(); closed instead when it has sent
        max_messages, is not usable or the pool holds max_idle already."""
        if not self.keep(key, conn):
            self.discard(conn)

    def keep(self, key: Hashable, conn: C) -> bool:
        """put() without the close: False when the connection is not kept (the caller then
        discards it, where QUIT may wait for the server)."""
        with self._lock:
            keep = (conn.usable(probe=False) and conn.messages_sent < self.max_messages
                    and sum(map(len, self._idle.values())) < self.max_idle)
            if keep:
                self._idle.setdefault(key, []).append((self._clock(), conn))
                self._counts["kept"] += 1
        return keep

    def discard(self, conn: C) -> None:
        """Close a connection that was not kept (QUIT, a blocking call)."""
        self._close([conn])

    def close_idle(self) -> int:
        """Close connections idle longer than idle_timeout (or gone), and those get() took out
        as such; returns how many.  The scheduler thread calls it once a second."""
        now = self._clock()
        with self._lock:
            expired, self._stale = self._stale, []
            for key, entries in list(self._idle.items()):
                fresh = [(s, c) for s, c in entries
                         if now - s <= self.idle_timeout and c.usable()]
                expired += [c for s, c in entries if (s, c) not in fresh]
                if fresh:
                    self._idle[key] = fresh
                else:
                    del self._idle[key]
        self._close(expired)
        return len(expired)

    def close_all(self) -> None:
        with self._lock:
            conns = [c for entries in self._idle.values() for _, c in entries] + self._stale
            self._idle.clear()
            self._stale = []
        self._close(conns)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "idle": sum(map(len, self._idle.values()))}

    def _close(self, conns: list[C]) -> None:
        # Outside the lock: QUIT waits for the network.
        for conn in conns:
            conn.close()
        with self._lock:
            self._counts["closed"] += len(conns)
