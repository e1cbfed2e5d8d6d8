"""The delivery side of the queue: claim due recipients, record what happened to them.

Claims are leases: `UPDATE ... RETURNING` moves due recipients from queued/deferred to active,
guarded by their state, so a recipient is never handed to two deliveries. A lease that runs
out (a crashed process) returns the recipient to the queue: delivery is at least once, as in
every MTA.

This connection runs with synchronous=NORMAL: in WAL mode its commits are not fsynced one by
one. That is safe here and only here, because every write it makes can be lost without losing
mail: a lost claim leaves the recipient queued; a lost "delivered" or "failed" (and the bounce
written in the same transaction) leaves it active, to be recovered and tried again. The cost
of a power failure is a duplicate, never a loss. Intake (Store) keeps synchronous=FULL.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from elemta.errors import QueueError
from elemta.queue import db, schema
from elemta.queue.jobs import Attempt, Job, Recipient, Result
from elemta.queue.model import PRIORITIES
from elemta.queue.results import ResultWriter

# Claiming, most urgent and oldest first. CANDIDATES is one range of the (state, priority,
# next_attempt) index, run for each waiting state and priority, so a claim never sorts the
# whole backlog of due mail. CLAIM then leases the chosen ones, guarded by state against a
# concurrent change (elemtactl, another scheduler). The guard is written `+state` so that SQLite
# always finds the rows by id: when the ids came from a subquery, a plain `state IN` made it
# walk the state index over every waiting recipient (65 ms with a million deferred, on every
# commit of new mail).
WAITING = ("queued", "deferred")
PRIORITY_VALUES = range(len(PRIORITIES))  # 0 = critical
# The due recipients of each (state, priority), each arm one range of the (state, priority,
# next_attempt) index, in one statement: ?1 is now, ?2 the most to take.
CANDIDATES = " UNION ALL ".join(
    f"SELECT * FROM (SELECT id, priority, next_attempt, '{state}' FROM recipients"
    f" WHERE state = '{state}' AND priority = {priority} AND next_attempt <= ?1"
    " ORDER BY next_attempt, id LIMIT ?2)"
    for state in WAITING for priority in PRIORITY_VALUES)
CLAIM = (
    "UPDATE recipients SET state = 'active', lease_until = ?, lease_owner = ?, updated = ?"
    " WHERE id IN ({ids}) AND +state = ?"
    " RETURNING id, queue_id, address, domain, orcpt, notify, attempts, warned, parent"
)
# The earliest next_attempt of each (state, priority), each arm a single probe of the
# (state, priority, next_attempt) index, in one statement: the scheduler asks after every look.
EARLIEST = "SELECT min(t) FROM (" + " UNION ALL ".join(
    f"SELECT min(next_attempt) AS t FROM recipients WHERE state = '{state}' AND priority = {priority}"
    for state in WAITING for priority in PRIORITY_VALUES) + ")"


class WorkQueue:
    """Claims and results on the queue database; see the module docstring.

    Writes go through one connection under a lock (a transaction belongs to the connection,
    not the thread). Reads use a connection per thread so they never wait behind a write.
    submit() hands results to a writer thread that commits whatever is waiting in one
    transaction: under load one BEGIN IMMEDIATE ... COMMIT covers hundreds of deliveries
    instead of each delivery thread queueing for the database's write lock.
    """

    def __init__(self, path: str, owner: str, *, clock: Callable[[], float] = time.time,
                 log: Callable[..., None] = lambda event, qid=None, level=0, **fields: None) -> None:
        """log: an EventLog (results_error, results_pending, results_written; see _commit)."""
        self.path = path
        self.owner = owner  # lease_owner: host:pid of the scheduler
        self._clock = clock
        self._log = log
        self._lease = 3600.0  # the last claim's lease, for renewing those of kept results
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._results = ResultWriter(self)

    def open(self) -> None:
        try:
            conn = db.connect(self.path, check_same_thread=False)
            conn.execute("PRAGMA synchronous = NORMAL")  # see the module docstring
            schema.migrate(conn)
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open queue database {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        self._results.start()

    def close(self, successor: WorkQueue | None = None) -> None:
        """Commit what was submitted, then close every connection.

        Results still kept then are tried for CLOSE_RETRY seconds, or, given a successor (the
        WorkQueue of the scheduler that replaces this one at a reload, same owner), handed to it.
        """
        self._results.stop(successor)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()

    @contextlib.contextmanager
    def _writing(self):
        with self._lock:
            if self._conn is None:
                raise QueueError("work queue is not open")
            try:
                with db.write(self._conn) as conn:
                    yield conn
            except sqlite3.Error as exc:
                raise QueueError(f"queue database: {exc}") from exc

    @contextlib.contextmanager
    def _reading(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._conn is None:
                    raise QueueError("work queue is not open")
                try:
                    conn = db.connect(self.path, readonly=True, check_same_thread=False)
                except sqlite3.Error as exc:
                    raise QueueError(f"cannot open queue database {self.path}: {exc}") from exc
                conn.row_factory = sqlite3.Row
                self._readers.append(conn)
            self._local.conn = conn
        try:
            yield conn
        except sqlite3.Error as exc:
            raise QueueError(f"queue database: {exc}") from exc

    # -- finding work ----------------------------------------------------------

    def next_due(self) -> float | None:
        """The earliest next_attempt of a recipient waiting to be tried, or None."""
        with self._reading() as conn:
            return conn.execute(EARLIEST).fetchone()[0]

    def claim(self, limit: int, lease: float) -> list[Job]:
        """Lease up to `limit` due recipients, most urgent and oldest first, grouped by message."""
        now = self._clock()
        self._lease = lease
        # Chosen on a read connection: this runs after every commit of new mail, and mostly
        # finds nothing to take, which then costs intake no wait for the write lock. The
        # state guard of CLAIM covers a change between the two.
        with self._reading() as conn:
            candidates = sorted(
                (priority, due, rid, state) for rid, priority, due, state in conn.execute(CANDIDATES, (now, limit))
            )[:limit]
        if not candidates:
            return []
        chosen = candidates
        with self._writing() as conn:
            by_message: dict[str, list[Recipient]] = {}
            # One claim per state it is taken from: a recipient waiting as 'queued' after an
            # earlier attempt was made due by elemtactl (release, requeue, flush), and its try
            # does not count for the retry schedule (Recipient.counted).
            for state in WAITING:
                ids = [rid for _, _, rid, st in chosen if st == state]
                if not ids:
                    continue
                rows = conn.execute(CLAIM.format(ids=",".join("?" * len(ids))),
                                    (now + lease, self.owner, now, *ids, state)).fetchall()
                for row in rows:
                    by_message.setdefault(row["queue_id"], []).append(Recipient(
                        row["id"], row["address"], row["domain"], row["orcpt"],
                        tuple(row["notify"].split(",")) if row["notify"] else (), row["attempts"],
                        bool(row["warned"]), row["parent"],
                        counted=not (state == "queued" and row["attempts"] > 0),
                    ))
            if not by_message:
                return []
            marks = ",".join("?" * len(by_message))
            messages = conn.execute(
                "SELECT queue_id, created, sender, size, priority, envid, ret, body_type, smtputf8, requiretls"
                f" FROM messages WHERE queue_id IN ({marks})", tuple(by_message),
            ).fetchall()
        jobs = [
            Job(m["queue_id"], m["created"], m["sender"], m["size"], m["priority"], m["envid"], m["ret"],
                m["body_type"], bool(m["smtputf8"]), tuple(sorted(by_message[m["queue_id"]], key=lambda r: r.id)),
                bool(m["requiretls"]))
            for m in messages
        ]
        jobs.sort(key=lambda j: (j.priority, j.created))
        return jobs

    def body(self, queue_id: str) -> bytes | None:
        with self._reading() as conn:
            row = conn.execute("SELECT data FROM bodies WHERE queue_id = ?", (queue_id,)).fetchone()
        return bytes(row[0]) if row else None

    # -- recording results -----------------------------------------------------

    def finish(self, queue_id: str, result: Result) -> None:
        """Write one delivery's outcomes, attempts and reports in one transaction.

        Only recipients this owner still holds as active are changed; the reports are
        queued in the same transaction, so a bounce exists exactly when its failure does.
        """
        with self._writing() as conn:
            self._apply(conn, queue_id, result, self._clock())

    def submit(self, queue_id: str, result: Result, on_commit: Callable[[], None] | None = None) -> None:
        """finish() on the writer thread (queue/results.py), without waiting; on_commit runs
        after the commit. Until then the recipients stay active (leased), so nothing claims them
        again. A result that cannot be written is kept and written again until it is."""
        self._results.submit(queue_id, result, on_commit)

    def give_back(self, queue_id: str, recipients: Iterable[Recipient | int]) -> None:
        """release() on the writer thread: in order with the results, and retried like them."""
        self.submit(queue_id, Result(release=list(recipients)))

    def flush(self) -> None:
        """Wait until everything submitted so far is committed (or has failed)."""
        self._results.flush()

    def unwritten(self) -> int:
        """Results kept in memory because they could not be written yet."""
        return self._results.unwritten()

    def backlogged(self) -> bool:
        """Too many results wait to be written: claim nothing more until some are."""
        return self._results.backlogged()

    @contextlib.contextmanager
    def _turn(self):
        """The writers' lock for a whole batch (db.writers_turn), taken after this object's
        own lock as every write here takes them."""
        with self._lock:
            if self._conn is None:
                yield
                return
            with db.writers_turn(self._conn):
                yield

    def _apply(self, conn: sqlite3.Connection, queue_id: str, result: Result, now: float) -> None:
        lost = set()
        for o in result.outcomes:
            # Delivered wins: the remote has the message, so it is recorded even if the lease
            # was lost meanwhile (the recipient went back to the queue and waits there), as
            # long as no other delivery holds it now.
            cur = conn.execute(
                "UPDATE recipients SET state = ?, last_error = ?, next_attempt = coalesce(?, next_attempt),"
                " attempts = attempts + ?, warned = warned OR ?, lease_until = NULL, lease_owner = NULL,"
                " updated = ? WHERE id = ? AND (state = 'active' AND lease_owner = ?"
                + (" OR state IN ('queued', 'deferred', 'held')" if o.state == "delivered" else "") + ")",
                (o.state, o.error or None, o.next_attempt, 1 if o.counted else 0, 1 if o.warned else 0, now,
                 o.recipient_id, self.owner),
            )
            if cur.rowcount != 1:
                lost.add(o.recipient_id)
        if result.release:
            self._release(conn, result.release, now)
        # A recipient whose lease was lost (elemtactl held or deleted it, or it expired and was
        # claimed again) belongs to someone else now: none of this result is about it any more.
        _insert_attempts(conn, queue_id, [a for a in result.attempts if a.recipient_id not in lost])
        if result.reports and not lost:
            schema.insert_messages(conn, result.reports, now)
        _mark_done(conn, queue_id, now)

    def expand(self, queue_id: str, recipient: Recipient, targets: Sequence[str], priority: int) -> None:
        """Replace an alias by its targets (RFC 3464 'expanded'): new rows, due now.

        A target keeps the alias as its original recipient (ORCPT), so a later bounce
        names the address the sender used.
        """
        self.expand_all(queue_id, [(recipient, targets)], priority)

    def expand_all(self, queue_id: str, expansions: Sequence[tuple[Recipient, Sequence[str]]],
                   priority: int, give_back: Iterable[Recipient] = ()) -> None:
        """expand() for several aliases of one message in one transaction, with release() of
        `give_back` (the message's other recipients claimed with them).

        The targets and those others become due together, so one claim takes them all and a
        mailbox reached through two aliases, or an alias and its own address, is seen as a
        duplicate there and delivered once.
        """
        now = self._clock()
        with self._writing() as conn:
            for recipient, targets in expansions:
                self._expand(conn, queue_id, recipient, targets, priority, now)
            self._release(conn, give_back, now)

    def _expand(self, conn: sqlite3.Connection, queue_id: str, recipient: Recipient, targets: Sequence[str],
                priority: int, now: float) -> None:
        orcpt = recipient.orcpt or f"rfc822;{recipient.address}"
        notify = ",".join(recipient.notify) or None
        cur = conn.execute(
            "UPDATE recipients SET state = 'delivered', last_error = ?, lease_until = NULL,"
            " lease_owner = NULL, updated = ? WHERE id = ? AND state = 'active' AND lease_owner = ?",
            (f"expanded to {', '.join(targets)}", now, recipient.id, self.owner),
        )
        if cur.rowcount != 1:
            return  # the lease was lost (e.g. elemtactl deleted the message): nothing to do
        conn.executemany(
            "INSERT INTO recipients (queue_id, address, domain, orcpt, notify, state, priority,"
            " next_attempt, updated, parent) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
            [(queue_id, t, t.rpartition("@")[2].lower(), orcpt, notify, priority, now, now, recipient.id)
             for t in targets],
        )
        conn.execute(
            "UPDATE messages SET recipients = recipients + ? WHERE queue_id = ?", (len(targets), queue_id)
        )
        _insert_attempts(conn, queue_id, [Attempt(
            recipient.id, now, "expanded", reply=f"expanded to {', '.join(targets)}")])

    def delivered_mailboxes(self, queue_id: str) -> list[tuple[int, str]]:
        """(id, address) of the message's final recipients already delivered (not the aliases
        that were expanded): a later target for one of them is a duplicate, not sent again."""
        with self._reading() as conn:
            rows = conn.execute("SELECT id, address, state, parent FROM recipients WHERE queue_id = ?",
                                (queue_id,)).fetchall()
        expanded = {row["parent"] for row in rows if row["parent"] is not None}
        return [(row["id"], row["address"]) for row in rows
                if row["state"] == "delivered" and row["id"] not in expanded]

    def release(self, recipients: Iterable[int | Recipient]) -> int:
        """Give claimed recipients back without an attempt (shutdown, or no free slot).

        A Recipient goes back to the state it was claimed from: a scheduled retry given back
        stays 'deferred', so its try still counts when it comes (a bare id goes to 'queued').
        """
        with self._writing() as conn:
            return self._release(conn, recipients, self._clock())

    def _release(self, conn: sqlite3.Connection, recipients: Iterable[int | Recipient], now: float) -> int:
        rows = []
        for r in recipients:
            retry = isinstance(r, Recipient) and r.counted and r.attempts > 0
            rows.append(("deferred" if retry else "queued", now, r.id if isinstance(r, Recipient) else r, self.owner))
        cur = conn.executemany(
            "UPDATE recipients SET state = ?, lease_until = NULL, lease_owner = NULL, updated = ?"
            " WHERE id = ? AND state = 'active' AND lease_owner = ?",
            rows,
        )
        return cur.rowcount

    def recover_expired(self) -> int:
        """Leases that ran out (their process died) go back to the queue; not those of results
        kept in memory (they were delivered, or tried: only the record is missing)."""
        held = self._results.held_ids
        with self._writing() as conn:
            return schema.release_active(conn, self._clock(), expired_only=True, keep=held)

    def purge(self, retention: float, limit: int = 500) -> int:
        """Delete up to `limit` finished messages older than `retention` seconds; return how many."""
        before = self._clock() - retention
        with self._writing() as conn:
            cur = conn.execute(
                "DELETE FROM messages WHERE queue_id IN (SELECT queue_id FROM messages"
                " WHERE done_at IS NOT NULL AND done_at <= ? ORDER BY done_at LIMIT ?)",
                (before, limit),
            )
            return cur.rowcount


def _insert_attempts(conn: sqlite3.Connection, queue_id: str, attempts: Sequence[Attempt]) -> None:
    conn.executemany(
        "INSERT INTO attempts (recipient_id, queue_id, at, host, reply, tls, outcome, ip, port, duration)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(a.recipient_id, queue_id, a.at, a.host or None, a.reply or None, a.tls or None, a.outcome,
          a.ip or None, a.port or None, a.duration) for a in attempts],
    )


def _mark_done(conn: sqlite3.Connection, queue_id: str, now: float) -> None:
    """When no recipient is left to deliver: drop the body now, keep the records for retention."""
    pending = conn.execute(
        "SELECT 1 FROM recipients WHERE queue_id = ? AND state NOT IN ('delivered', 'failed') LIMIT 1",
        (queue_id,),
    ).fetchone()
    if pending is None:
        conn.execute("UPDATE messages SET done_at = ? WHERE queue_id = ? AND done_at IS NULL", (now, queue_id))
        conn.execute("DELETE FROM bodies WHERE queue_id = ?", (queue_id,))
