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
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from elemta.errors import QueueError
from elemta.queue import db, schema
from elemta.queue.model import PRIORITIES, NewMessage

FINAL_STATES = ("delivered", "failed")


@dataclass(frozen=True)
class Recipient:
    id: int
    address: str
    domain: str
    orcpt: str | None
    notify: tuple[str, ...]
    attempts: int
    warned: bool
    parent: int | None = None  # the alias row this one was expanded from
    # False for an admin's "try now": a recipient tried before and made due again by
    # elemtactl release/requeue/flush (it waits as 'queued', not 'deferred'). Such a try is
    # recorded in the history but is no failed attempt of the retry schedule: counting it
    # pushed the next retry out (three commands in a second made attempt 1 into attempt 4).
    counted: bool = True


@dataclass(frozen=True)
class Job:
    """One message and those of its recipients that were claimed together."""

    queue_id: str
    created: float
    sender: str
    size: int
    priority: int
    envid: str | None
    ret: str | None
    body_type: str
    smtputf8: bool
    recipients: tuple[Recipient, ...]
    requiretls: bool = False  # RFC 8689 (delivery/attempt.py)


@dataclass(frozen=True)
class Attempt:
    """One try of one recipient at one host, for the history (`elemtactl queue trace`)."""

    recipient_id: int
    at: float
    outcome: str  # delivered | deferred | failed | expanded | discarded | ...
    reply: str = ""
    host: str = ""
    ip: str = ""
    port: int = 0
    tls: str = ""
    duration: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """Where one claimed recipient goes next."""

    recipient_id: int
    state: str  # delivered | deferred | failed | held
    error: str = ""  # becomes last_error
    next_attempt: float | None = None  # deferred: when it is due again
    warned: bool = False  # a delay warning was sent (never send two)
    counted: bool = True  # adds one to the recipient's attempts (see Recipient.counted)


@dataclass
class Result:
    """Everything one delivery decided, written in one transaction."""

    outcomes: list[Outcome] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    reports: list[NewMessage] = field(default_factory=list)  # bounces / DSNs to enqueue
    # Claimed recipients given back untried (release()): written by the same writer, in order,
    # and retried like the rest when the write fails, so they do not wait for a lease to end.
    release: list[Recipient | int] = field(default_factory=list)

    def recipient_ids(self) -> set[int]:
        return {o.recipient_id for o in self.outcomes} | {
            r.id if isinstance(r, Recipient) else r for r in self.release}


_STOP = object()
# Levels of the events given to `log` (elemta.log's; the queue sits below it, see test_layers).
WARNING, ERROR = 30, 40
# A result that could not be written (a full disk, a damaged or locked database) is kept in
# memory and written again, first after RETRY_FIRST seconds, then twice as long each time up to
# RETRY_MAX; at close, for up to CLOSE_RETRY seconds more. Its recipients stay leased meanwhile:
# recover_expired() leaves them alone and each failed retry renews their lease (when the
# database takes that much), since delivering them again would duplicate the message.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
CLOSE_RETRY = 10.0
# Kept results are small (outcomes, attempt rows, at most a report); at this many the scheduler
# claims nothing more until some are written (backlogged()), so memory stays bounded and no
# result is ever dropped.
MAX_UNWRITTEN = 1000
# A recipient whose delivery ended in an error of elemta's own (a bug, a result the database
# refuses) is due again this many seconds later: soon, not when its hour-long lease runs out,
# and not at once, which would turn a deterministic error into a busy loop.
ERROR_RETRY = 60.0
_BATCH_MAX = 512


# Claiming, most urgent and oldest first. CANDIDATES is one range of the (state, priority,
# next_attempt) index, run for each waiting state and priority, so a claim never sorts the
# whole backlog of due mail. CLAIM then leases the chosen ones, guarded by state against a
# concurrent change (elemtactl, another scheduler). The guard is written `+state` so that SQLite
# always finds the rows by id: when the ids came from a subquery, a plain `state IN` made it
# walk the state index over every waiting recipient (65 ms with a million deferred, on every
# commit of new mail).
WAITING = ("queued", "deferred")
PRIORITY_VALUES = range(len(PRIORITIES))  # 0 = critical
CANDIDATES = (
    "SELECT id, priority, next_attempt FROM recipients WHERE state = ? AND priority = ?"
    " AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?"
)
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
        self._data_version = -1
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._pending: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        # Results that failed to be written, oldest first: [item, tries, first failure
        # (monotonic)]; only the writer thread changes it.
        self._unwritten: list[list] = []
        self._held_ids: frozenset[int] = frozenset()  # their recipients, for recover_expired
        self._retry_at = 0.0
        self._retry_wait = RETRY_FIRST
        self._successor: WorkQueue | None = None
        self._submitting = threading.Lock()
        self._closed = False

    def open(self) -> None:
        try:
            conn = db.connect(self.path, check_same_thread=False)
            conn.execute("PRAGMA synchronous = NORMAL")  # see the module docstring
            schema.migrate(conn)
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open queue database {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        self._writer = threading.Thread(target=self._write_results, name="results-writer", daemon=True)
        self._writer.start()

    def close(self, successor: WorkQueue | None = None) -> None:
        """Commit what was submitted, then close every connection.

        Results still kept then are tried for CLOSE_RETRY seconds, or, given a successor (the
        WorkQueue of the scheduler that replaces this one at a reload, same owner), handed to it.
        """
        self._successor = successor
        if self._writer is not None:
            self._pending.put(_STOP)
            self._writer.join()
            self._writer = None
        with self._submitting:
            self._closed = True  # what is submitted from now on goes to the successor
            late = []
            while not self._pending.empty():
                late.append(self._pending.get_nowait())
                self._pending.task_done()
        for item in late:
            if successor is not None and item is not _STOP:
                successor.submit(*item)
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

    def changed(self) -> bool:
        """True when another connection committed since the last call (PRAGMA data_version).

        This is how a scheduler notices mail queued by other processes and changes made by
        elemtactl without polling the recipients table.
        """
        with self._reading() as conn:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        changed, self._data_version = version != self._data_version, version
        return changed

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
                (priority, due, rid, state)
                for state in WAITING for priority in PRIORITY_VALUES
                for rid, priority, due in conn.execute(CANDIDATES, (state, priority, now, limit))
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
        """finish() on the writer thread, without waiting; on_commit runs after the commit.

        Until then the recipients stay active (leased), so nothing claims them again. A result
        that cannot be written is kept and written again until it is (see _commit).
        """
        with self._submitting:
            if not self._closed:
                self._pending.put((queue_id, result, on_commit))
                return
        # Closed: a delivery abandoned at a reload ended after all. Its result goes to the new
        # scheduler's writer (without one it is lost, and the lease's end retries the recipients).
        if self._successor is not None and self._successor.owner == self.owner:
            self._successor.submit(queue_id, result, on_commit)

    def give_back(self, queue_id: str, recipients: Iterable[Recipient | int]) -> None:
        """release() on the writer thread: in order with the results, and retried like them."""
        self.submit(queue_id, Result(release=list(recipients)))

    def flush(self) -> None:
        """Wait until everything submitted so far is committed (or has failed)."""
        self._pending.join()

    def unwritten(self) -> int:
        """Results kept in memory because they could not be written yet."""
        return len(self._unwritten)

    def backlogged(self) -> bool:
        """Too many results wait to be written: claim nothing more until some are."""
        return len(self._unwritten) >= MAX_UNWRITTEN

    def _write_results(self) -> None:
        while True:
            try:
                wait = max(0.0, self._retry_at - time.monotonic()) if self._unwritten else None
                batch = [self._pending.get(timeout=wait)]
            except queue.Empty:
                batch = []
            with self._turn():
                self._write_batch(batch)
            if batch and batch[-1] is _STOP:
                if self._successor is not None and self._successor.owner == self.owner:
                    for entry in self._unwritten:  # in order; kept again there if still refused
                        self._successor.submit(*entry[0])
                    self._unwritten, self._held_ids = [], frozenset()
                self._last_tries()
                return

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

    def _write_batch(self, batch: list) -> None:
        """Add what waits to batch (in the writers' turn: what came while waiting for it
        joins), then write the batch's results and retry the kept ones when due."""
        # (empty() first, not get_nowait()'s Empty: this thread is the only taker.)
        while batch and batch[-1] is not _STOP and len(batch) < _BATCH_MAX and not self._pending.empty():
            batch.append(self._pending.get_nowait())
        items = []
        for item in batch:
            if item is _STOP:
                continue
            if self._held_ids & item[1].recipient_ids():
                # About a recipient whose earlier result waits: written after it, never
                # before (a give-back must not overtake the delivery it follows).
                self._keep(item, None)
            else:
                items.append(item)
        try:
            if self._unwritten and time.monotonic() >= self._retry_at:
                self._retry()
            if items:
                self._commit(items)
        finally:
            for _ in batch:
                self._pending.task_done()

    def _commit(self, items: list, tries: int = 0) -> bool:
        """Write items in one transaction; True if written.

        On failure a batch is written again item by item. An item the database refuses for its
        own content (an integrity error) is salvaged: its delivered outcomes are written alone
        and its other recipients are due again in ERROR_RETRY seconds. An item that fails for any
        other reason (a full disk, an I/O error, a locked or damaged database) is kept in memory
        (tries == 0: first failure) and written again by _retry().
        """
        try:
            with self._writing() as conn:
                now = self._clock()
                for queue_id, result, _ in items:
                    self._apply(conn, queue_id, result, now)
        except QueueError as exc:
            if len(items) > 1:  # find the culprit: the others are written one by one
                for item in items:
                    if self._held_ids & item[1].recipient_ids():
                        self._keep(item, None)  # behind an earlier one of this batch, kept
                    else:
                        self._commit([item])
                return False
            if isinstance(exc.__cause__, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                # Not the disk or the database but this result itself: writing it again cannot help.
                return self._salvage(items[0], exc, tries)
            if not tries:
                self._keep(items[0], exc)
            return False
        for _, _, on_commit in items:
            if on_commit is not None:
                on_commit()
        return True

    def _keep(self, item, exc: Exception | None) -> None:
        """Keep a result that could not be written (exc), or one that must wait behind one (None)."""
        if not self._unwritten:
            self._retry_at, self._retry_wait = time.monotonic() + RETRY_FIRST, RETRY_FIRST
        self._unwritten.append([item, 0 if exc is not None else -1, time.monotonic()])
        self._held_ids = self._held_ids | item[1].recipient_ids()
        if exc is not None:
            self._log("results_error", qid=item[0], level=ERROR, error=str(exc)[:200],
                      kept="in memory, written again until it is", waiting=len(self._unwritten))

    def _salvage(self, item, exc: Exception, tries: int) -> bool:
        """A result the database refuses: its delivered outcomes win (written alone, so the
        message is not sent again); its other recipients are given back, due in ERROR_RETRY."""
        queue_id, result, on_commit = item
        due = self._clock() + ERROR_RETRY
        outcomes = [o if o.state == "delivered" else
                    Outcome(o.recipient_id, "deferred", f"result not recorded: {exc}"[:300],
                            next_attempt=due, counted=False)
                    for o in result.outcomes]
        released = [r.id if isinstance(r, Recipient) else r for r in result.release]
        outcomes += [Outcome(rid, "deferred", f"result not recorded: {exc}"[:300], next_attempt=due, counted=False)
                     for rid in released if rid not in {o.recipient_id for o in outcomes}]
        self._log("results_error", qid=queue_id, level=ERROR, error=str(exc)[:200],
                  kept="refused: delivered recipients recorded, the others retried later")
        if not outcomes or (outcomes == result.outcomes and not (result.attempts or result.reports)):
            return False  # nothing left to try
        return self._commit([(queue_id, Result(outcomes), on_commit)], tries)

    def _retry(self) -> None:
        """Write the kept results again, oldest first; stop at the first that still fails."""
        while self._unwritten:
            entry = self._unwritten[0]
            entry[1] += 1
            if not self._commit([entry[0]], tries=max(1, entry[1])):
                self._retry_wait = min(self._retry_wait * 2, RETRY_MAX)
                self._retry_at = time.monotonic() + self._retry_wait
                self._renew()
                self._log("results_pending", qid=entry[0][0], level=WARNING,
                          waiting=len(self._unwritten), tries=entry[1] + 1, retry_in=round(self._retry_wait, 1))
                return
            self._unwritten.pop(0)
            self._held_ids = frozenset(rid for e in self._unwritten for rid in e[0][1].recipient_ids())
            if entry[1] > 0:  # it had failed (not merely waited behind one that had)
                self._log("results_written", qid=entry[0][0], level=WARNING, tries=entry[1] + 1,
                          waited=round(time.monotonic() - entry[2], 1), waiting=len(self._unwritten))
        self._retry_wait = RETRY_FIRST

    def _renew(self) -> None:
        """Extend the leases of the kept results' recipients (best effort: the database may
        refuse this write too), so no other process's recovery takes them while they wait."""
        ids = sorted(self._held_ids)
        if not ids:
            return
        try:
            with self._writing() as conn:
                now = self._clock()
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    conn.execute(
                        "UPDATE recipients SET lease_until = max(coalesce(lease_until, 0), ?)"
                        f" WHERE id IN ({','.join('?' * len(chunk))}) AND state = 'active' AND lease_owner = ?",
                        (now + self._lease, *chunk, self.owner))
        except QueueError:
            pass

    def _last_tries(self) -> None:
        """At close: keep trying the kept results for CLOSE_RETRY seconds, then say which are
        lost (their recipients stay leased: the next start delivers them again)."""
        deadline = time.monotonic() + CLOSE_RETRY
        while self._unwritten and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))
            self._retry()
        for (queue_id, _, _), tries, _ in self._unwritten:
            self._log("results_error", qid=queue_id, level=ERROR, tries=max(0, tries) + 1,
                      kept="lost at stop: its recipients are delivered again at the next start")

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
        held = self._held_ids
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
