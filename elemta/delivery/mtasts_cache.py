"""MTA-STS policies kept on disk (RFC 8461 §5.1): a policy fetched once is applied for its
max_age even across restarts, which is what keeps an attacker who later hides the TXT record
or the policy host from turning it off.  An SQLite file beside the queue (spool_dir/mta-sts.db),
not a table in queue.db: the delivery process writes it, elemtactl reads it, and neither then
waits for the queue's writers.  Which policy to fetch and apply is mtasts.py's.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict

from elemta.delivery.mtasts import Cached, Policy
from elemta.queue import db

FILENAME = "mta-sts.db"
MEMO_SIZE = 10_000  # domains whose policy (or lack of one) the writer remembers
# After a failed fetch, the domain's policy host is not asked again for this long: a host that
# is down must not cost a timeout at every delivery (its cached policy still applies).
RETRY_FAILED_FETCH = 300.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    domain TEXT PRIMARY KEY,    -- lower case, no final dot
    id TEXT NOT NULL,           -- the TXT record's id the policy was fetched under
    fetched REAL NOT NULL,      -- Unix time
    mode TEXT NOT NULL,
    max_age INTEGER NOT NULL,
    mx TEXT NOT NULL            -- the patterns, one per line
);
CREATE TABLE IF NOT EXISTS failures (
    domain TEXT PRIMARY KEY,
    at REAL NOT NULL,           -- the last failed fetch
    reason TEXT NOT NULL
);
"""


def _key(domain: str) -> str:
    return domain.rstrip(".").lower()


class PolicyCache:
    def __init__(self, spool_dir: str, *, readonly: bool = False):
        self.path = os.path.join(spool_dir, FILENAME)
        # readonly (elemtactl): never creates the file; a missing one means nothing cached.
        self._conn: sqlite3.Connection | None = None
        # One connection shared by the delivery threads: one of them at a time uses it (a second
        # BEGIN inside another thread's transaction would fail).
        self._lock = threading.Lock()
        # What the writer read or wrote, by domain: it is the file's only writer, so every MX
        # delivery need not read the file again (a reader, elemtactl, keeps nothing).
        self._memo: OrderedDict[str, Cached | None] | None = None if readonly else OrderedDict()
        if readonly and not os.path.exists(self.path):
            return
        self._conn = db.connect(self.path, readonly=readonly, create=not readonly, check_same_thread=False)
        if not readonly:
            with db.write(self._conn) as conn:
                for statement in _statements():  # not executescript(): it would commit first
                    conn.execute(statement)

    def get(self, domain: str) -> Cached | None:
        key = _key(domain)
        with self._lock:
            if self._conn is None:
                return None
            if self._memo is not None and key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
            row = self._conn.execute("SELECT id, fetched, mode, max_age, mx FROM policies WHERE domain = ?",
                                     (key,)).fetchone()
            cached = None
            if row is not None:
                record_id, fetched, mode, max_age, mx = row
                cached = Cached(Policy(mode, max_age, tuple(mx.split("\n")) if mx else ()), record_id, fetched)
            self._remember(key, cached)
            return cached

    def put(self, domain: str, cached: Cached) -> None:
        """Keep a policy just fetched (and forget an earlier failure to fetch it)."""
        key, p = _key(domain), cached.policy
        with self._lock:
            assert self._conn is not None, "a read-only cache is never written"
            with db.write(self._conn) as conn:
                conn.execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?, ?, ?)",
                             (key, cached.id, cached.fetched, p.mode, p.max_age, "\n".join(p.mx)))
                conn.execute("DELETE FROM failures WHERE domain = ?", (key,))
            self._remember(key, cached)

    def fetch_failed(self, domain: str, at: float, reason: str) -> None:
        with self._lock:
            assert self._conn is not None, "a read-only cache is never written"
            with db.write(self._conn) as conn:
                conn.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (_key(domain), at, reason[:300]))

    def last_failure(self, domain: str) -> tuple[float, str] | None:
        """(when, why) of the last failed fetch since the last good one, or None."""
        with self._lock:
            if self._conn is None:
                return None
            row = self._conn.execute("SELECT at, reason FROM failures WHERE domain = ?",
                                     (_key(domain),)).fetchone()
        return (row[0], row[1]) if row else None

    def _remember(self, key: str, cached: Cached | None) -> None:
        if self._memo is not None:
            self._memo[key] = cached
            self._memo.move_to_end(key)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)

    def may_fetch(self, domain: str, now: float) -> bool:
        """False while a failed fetch is recent (RETRY_FAILED_FETCH)."""
        failure = self.last_failure(domain)
        return failure is None or now - failure[0] >= RETRY_FAILED_FETCH

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _statements() -> list[str]:
    return [s for s in SCHEMA.split(";") if s.strip()]
