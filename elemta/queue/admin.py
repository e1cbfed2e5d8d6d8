"""Queue administration: what `elemtactl queue ...` does to the daemon's queue database.

QueueAdmin opens the same SQLite file as the daemon, never creating it: a mistyped spool_dir is
reported (QueueUnavailable), not papered over with an empty queue. Reads run on a read-only
connection (mode=ro, query_only), each in one read transaction, so they see one consistent
moment of the queue and work while the daemon is stopped.

Changes are safe while the daemon runs:
  * each is a short BEGIN IMMEDIATE transaction (the daemon's writers wait for it, at most the
    busy timeout), and work on ALL or on many IDs is cut into transactions of _CHUNK (1,000)
    recipients or 500 IDs, so intake (a 250 waits for its commit) never stalls behind one big
    UPDATE, only for some milliseconds at a time;
  * every UPDATE is guarded by the recipient's state (`... WHERE state IN (...)`), so a
    recipient the scheduler has claimed ('active', mid-delivery) is never touched: hold and
    delete skip it and say so;
  * recipients made due are 'queued' with next_attempt = now, exactly what WorkQueue.claim()
    takes; the running scheduler's next claim, at most 0.25 s later (its poll), takes them.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Self

from elemta.errors import QueueError
from elemta.queue import db, query, schema
from elemta.queue.model import priority_value
from elemta.queue.query import Filters, MessageDetail, NoSuchMessage, Page, Stats, Trace

__all__ = [
    "ALL", "Change", "Filters", "NoSuchMessage", "QueueAdmin", "QueueBusy", "QueuePermissionError",
    "QueueUnavailable",
]

ALL: Final = "ALL"  # every message, as in postsuper -d ALL
MIN_VERSION = 2  # the oldest schema these queries can read (done_at, attempts.ip/port/duration)
_IDS_PER_STATEMENT = 500  # well below SQLite's limit of bound variables
_CHUNK = 1000  # recipients (or messages) per transaction when changing ALL: ~20-40 ms each


class QueueUnavailable(QueueError):
    """No queue database at the configured path, or one this elemtactl cannot read."""


class QueuePermissionError(QueueError):
    """The queue database exists but this user may not read (or change) it."""


class QueueBusy(QueueError):
    """The database stayed locked for longer than the busy timeout."""


@dataclass(frozen=True)
class Change:
    """What a change did; the field names are elemtactl's --json keys."""

    action: str
    messages: int  # messages with at least one recipient changed (delete: messages removed)
    recipients: int  # recipients changed (delete: recipients removed with their messages)
    skipped: tuple[str, ...] = ()  # messages left alone: a recipient is being delivered
    not_found: tuple[str, ...] = ()  # IDs with no message


# Queued recipients not yet due, as a range of the (state, priority, next_attempt) index for
# each priority: with the state alone SQLite would walk every queued recipient.
_QUEUED_NOT_DUE = "state = 'queued' AND priority IN (0, 1, 2, 3) AND next_attempt > :now"

# (states a recipient may be in, the state it moves to, whether it becomes due now)
_MOVES = {
    "hold": ("state IN ('queued', 'deferred')", "held", False),
    "release": ("state = 'held'", "queued", True),
    # A queued recipient is due from its arrival on; one with a later next_attempt (nothing
    # writes that today) is made due too, so "due now" holds for every recipient it could mean.
    "requeue": (f"(state = 'deferred' OR ({_QUEUED_NOT_DUE}))", "queued", True),
}


class QueueAdmin:
    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None

    def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.close()
        self._reader = self._writer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections ---------------------------------------------------------------------------

    def _connect(self, write: bool) -> sqlite3.Connection:
        spool = os.path.dirname(os.path.abspath(self.path))
        try:
            os.stat(self.path)
        except FileNotFoundError:
            if not os.path.isdir(spool):
                raise QueueUnavailable(f"spool directory {spool} does not exist (check server.spool_dir)") from None
            raise QueueUnavailable(f"no queue database {self.path} (has elemta run with this spool_dir?)") from None
        except PermissionError:
            raise QueuePermissionError(f"{self.path}: permission denied") from None
        except OSError as exc:
            raise QueueUnavailable(f"{self.path}: {exc.strerror}") from None
        if not os.access(self.path, os.R_OK | (os.W_OK if write else 0)):
            raise QueuePermissionError(f"{self.path}: permission denied ({'read-write' if write else 'read'} access)")
        conn = None
        try:
            conn = db.connect(self.path, readonly=not write, create=False)
            conn.row_factory = sqlite3.Row
            found = schema.version(conn)
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # opens the WAL index (-shm)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise self._translate(exc) from None
        problem = None
        if found == 0:
            problem = "is not an elemta queue database"
        elif found < MIN_VERSION:
            problem = f"has the old schema version {found}: start elemta once to upgrade it"
        elif found > schema.VERSION:
            problem = f"has schema version {found}, newer than this elemtactl knows ({schema.VERSION})"
        if problem is not None:
            conn.close()
            raise QueueUnavailable(f"{self.path} {problem}")
        return conn

    def _translate(self, exc: sqlite3.Error) -> QueueError:
        name = getattr(exc, "sqlite_errorname", "") or ""
        # The file exists (checked before connecting): CANTOPEN/READONLY is the -wal or -shm file
        # beside it, or a directory this user may not write to.
        if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_CANTOPEN")):
            return QueuePermissionError(f"{self.path}: permission denied ({exc})")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return QueueBusy(f"{self.path} stayed locked for {db.BUSY_TIMEOUT_MS / 1000:g}s; try again")
        return QueueUnavailable(f"queue database {self.path}: {exc}")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: several SELECTs see the same state of the queue."""
        if self._reader is None:
            self._reader = self._connect(write=False)
        conn = self._reader
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE: see db.write)."""
        if self._writer is None:
            self._writer = self._connect(write=True)
        try:
            with db.write(self._writer) as conn:
                yield conn
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    # -- reads ---------------------------------------------------------------------------------

    def list(self, filters: Filters | None = None, limit: int = 100, after: str | None = None) -> Page:
        """Messages oldest first, `limit` at a time (0 = all); pass Page.next_after as `after`."""
        if limit < 0:
            raise ValueError("limit must be 0 (no limit) or more")
        with self._reading() as conn:
            return query.list_messages(conn, filters or Filters(), limit, after or "", self._clock())

    def show(self, queue_id: str) -> MessageDetail:
        with self._reading() as conn:
            return query.show(conn, queue_id, self._clock())

    def body(self, queue_id: str) -> bytes | None:
        """The stored message text, or None once it was dropped (every recipient final)."""
        with self._reading() as conn:
            return query.body(conn, queue_id)

    def trace(self, queue_id: str) -> Trace:
        with self._reading() as conn:
            return query.trace(conn, queue_id)

    def stats(self) -> Stats:
        with self._reading() as conn:
            return query.stats(conn, self._clock())

    # -- changes -------------------------------------------------------------------------------

    def hold(self, which: Sequence[str] | str) -> Change:
        """Queued and deferred recipients -> held (never delivered, never expire, until release)."""
        return self._move("hold", which)

    def release(self, which: Sequence[str] | str) -> Change:
        """Held recipients -> queued, due now."""
        return self._move("release", which)

    def requeue(self, which: Sequence[str] | str) -> Change:
        """Deferred recipients -> queued, due now; their attempts count on (the retry schedule too)."""
        return self._move("requeue", which)

    def flush(self, domain: str | None = None) -> Change:
        """Every queued or deferred recipient (of one recipient domain) due now."""
        params = {} if domain is None else {"domain": domain.lower().rstrip(".")}
        return self._move_all("flush", flush_guard(domain is not None), "queued", True, params)

    def delete(self, which: Sequence[str] | str) -> Change:
        """Remove messages with their recipients, attempts and body; no bounce (postsuper -d).

        A message with a recipient being delivered is skipped: its delivery would still happen.
        """
        if _is_all(which):
            return self._delete_all()
        wanted = _unique(which)
        deleted, recipients, skipped = 0, 0, []
        seen: set[str] = set()
        for chunk in _chunks(wanted, _IDS_PER_STATEMENT):
            marks = ",".join("?" * len(chunk))
            with self._writing() as conn:
                rows = conn.execute(
                    "SELECT m.queue_id, (SELECT count(*) FROM recipients r WHERE r.queue_id = m.queue_id),"
                    " EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND r.state = 'active')"
                    f" FROM messages m WHERE m.queue_id IN ({marks})", chunk,
                ).fetchall()
                doomed = [row[0] for row in rows if not row[2]]
                if doomed:
                    conn.execute(f"DELETE FROM messages WHERE queue_id IN ({','.join('?' * len(doomed))})", doomed)
            seen.update(row[0] for row in rows)
            skipped += [row[0] for row in rows if row[2]]
            deleted += len(doomed)
            recipients += sum(row[1] for row in rows if not row[2])
        return Change("delete", deleted, recipients, tuple(skipped), tuple(q for q in wanted if q not in seen))

    def set_priority(self, queue_id: str, level: str) -> Change:
        """The message's priority and that of its recipients still to deliver (claims go by it)."""
        value = priority_value(level)
        with self._writing() as conn:
            found = conn.execute("SELECT priority FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
            if found is None:
                raise NoSuchMessage(queue_id)
            changed = conn.execute(
                "UPDATE messages SET priority = ? WHERE queue_id = ? AND priority != ?", (value, queue_id, value)
            ).rowcount
            recipients = conn.execute(
                "UPDATE recipients SET priority = ?, updated = ? WHERE queue_id = ? AND priority != ?"
                " AND state NOT IN ('delivered', 'failed')", (value, self._clock(), queue_id, value),
            ).rowcount
        return Change("priority", changed, recipients)

    def _move(self, action: str, which: Sequence[str] | str) -> Change:
        guard, to, due = _MOVES[action]
        if _is_all(which):
            change = self._move_all(action, guard, to, due, {})
            return dataclasses.replace(change, skipped=self._active_messages()) if action == "hold" else change
        wanted = _unique(which)
        now = self._clock()
        changed: set[str] = set()
        seen: set[str] = set()
        recipients, skipped = 0, []
        for chunk in _chunks(wanted, _IDS_PER_STATEMENT):
            names = {f"q{i}": qid for i, qid in enumerate(chunk)}
            marks = ",".join(f":{name}" for name in names)
            with self._writing() as conn:
                seen.update(row[0] for row in conn.execute(
                    f"SELECT queue_id FROM messages WHERE queue_id IN ({marks})", names))
                rows = conn.execute(
                    f"UPDATE recipients SET state = :to, updated = :now{', next_attempt = :now' if due else ''}"
                    f" WHERE queue_id IN ({marks}) AND {guard} RETURNING queue_id",
                    {**names, "to": to, "now": now},
                ).fetchall()
                if action == "hold":
                    skipped += [row[0] for row in conn.execute(
                        f"SELECT DISTINCT queue_id FROM recipients WHERE queue_id IN ({marks}) AND state = 'active'",
                        names)]
            changed.update(row[0] for row in rows)
            recipients += len(rows)
        return Change(action, len(changed), recipients, tuple(skipped), tuple(q for q in wanted if q not in seen))

    def _move_all(self, action: str, guard: str, to: str, due: bool, params: dict) -> Change:
        """Every recipient matching `guard`, _CHUNK per transaction: a changed recipient no
        longer matches, so each round takes the next ones until none is left."""
        now = self._clock()
        changed: set[str] = set()
        recipients = 0
        while True:
            with self._writing() as conn:
                rows = conn.execute(
                    f"UPDATE recipients SET state = :to, updated = :now{', next_attempt = :now' if due else ''}"
                    f" WHERE id IN (SELECT id FROM recipients WHERE {guard} LIMIT :chunk) RETURNING queue_id",
                    {**params, "to": to, "now": now, "chunk": _CHUNK},
                ).fetchall()
            changed.update(row[0] for row in rows)
            recipients += len(rows)
            if len(rows) < _CHUNK:
                return Change(action, len(changed), recipients)

    def _delete_all(self) -> Change:
        """Every message not yet final (what `queue list` shows), in slices of _CHUNK messages."""
        deleted, recipients, skipped, last = 0, 0, [], ""
        while True:
            with self._writing() as conn:
                rows = conn.execute(
                    "SELECT m.queue_id, (SELECT count(*) FROM recipients r WHERE r.queue_id = m.queue_id),"
                    " EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND r.state = 'active')"
                    " FROM messages m WHERE m.done_at IS NULL AND m.queue_id > ? ORDER BY m.queue_id LIMIT ?",
                    (last, _CHUNK),
                ).fetchall()
                doomed = [row[0] for row in rows if not row[2]]
                for chunk in _chunks(doomed, _IDS_PER_STATEMENT):
                    conn.execute(f"DELETE FROM messages WHERE queue_id IN ({','.join('?' * len(chunk))})", chunk)
            skipped += [row[0] for row in rows if row[2]]
            deleted += len(doomed)
            recipients += sum(row[1] for row in rows if not row[2])
            if len(rows) < _CHUNK:
                return Change("delete", deleted, recipients, tuple(skipped))
            last = rows[-1][0]

    def _active_messages(self) -> tuple[str, ...]:
        with self._reading() as conn:
            return tuple(row[0] for row in conn.execute(
                "SELECT DISTINCT queue_id FROM recipients WHERE state = 'active' ORDER BY queue_id"))


def flush_guard(by_domain: bool) -> str:
    """The recipients `flush` makes due. Each round of _move_all searches again from the start,
    so the search must meet only rows still to change: a domain's deferred ones through
    (domain, state, queue_id), and the few queued ones not yet due through (state, priority,
    next_attempt) -- `+domain` keeps SQLite from walking every queued recipient of a big domain
    each round."""
    if not by_domain:
        return _MOVES["requeue"][0]
    return ("((domain = :domain AND state = 'deferred')"
            f" OR (+domain = :domain AND {_QUEUED_NOT_DUE}))")


def _is_all(which: Sequence[str] | str) -> bool:
    if isinstance(which, str):
        if which != ALL:
            raise TypeError(f"expected a sequence of queue IDs or ALL, got the string {which!r}")
        return True
    return False


def _unique(which: Sequence[str]) -> list[str]:
    """The IDs in order, once each; malformed ones are kept (they are reported as not found)."""
    return list(dict.fromkeys(which))


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
