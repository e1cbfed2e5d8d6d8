"""WorkQueue's writer thread: delivery results committed in batches, and kept when they cannot be.

A delivery's result (WorkQueue.submit) is written by one thread, which commits whatever is
waiting in one transaction: under load one BEGIN IMMEDIATE ... COMMIT covers hundreds of
deliveries instead of each delivery thread queueing for the database's write lock. A result the
database does not take (a full disk, a damaged or locked database) is kept in memory, in order,
and written again until it is; its recipients stay leased meanwhile, since delivering them again
would duplicate the message. The SQL is WorkQueue's (_apply, _writing, _turn).
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Protocol

from elemta.errors import QueueError
from elemta.queue.jobs import Outcome, Recipient, Result


class Work(Protocol):
    """What the writer uses of its queue/work.py WorkQueue (named here, not imported, so the
    two modules do not import each other): the owner of the leases, the SQL and the clock."""

    owner: str
    _lease: float

    def submit(self, queue_id: str, result: Result, on_commit: Callable[[], None] | None = None) -> None: ...

    def _clock(self) -> float: ...

    def _log(self, event: str, qid: str | None = None, level: int = 0, **fields: object) -> None: ...

    def _turn(self) -> contextlib.AbstractContextManager: ...

    def _writing(self) -> contextlib.AbstractContextManager: ...

    def _apply(self, conn: sqlite3.Connection, queue_id: str, result: Result, now: float) -> None: ...

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
# Seconds between the starts of two transactions of results: under load one takes what several
# deliveries ended meanwhile, instead of a transaction per result or two.
SPACING = 0.01


class ResultWriter:
    """The writer thread of one WorkQueue, its queue of results and the results it keeps."""

    def __init__(self, work: Work) -> None:
        self._work = work
        self._pending: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        # Results that failed to be written, oldest first: [item, tries, first failure
        # (monotonic)]; only the writer thread changes it.
        self._unwritten: list[list] = []
        self._held_ids: frozenset[int] = frozenset()  # their recipients, for recover_expired
        self._retry_at = 0.0
        self._retry_wait = RETRY_FIRST
        self._successor: Work | None = None
        self._submitting = threading.Lock()
        self._closed = False

    @property
    def held_ids(self) -> frozenset[int]:
        """The recipients of the kept results: leased, and not to be recovered."""
        return self._held_ids

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="results-writer", daemon=True)
        self._thread.start()

    def stop(self, successor: Work | None) -> None:
        """Commit what was submitted; then what is submitted goes to successor (if any)."""
        self._successor = successor
        if self._thread is not None:
            self._pending.put(_STOP)
            self._thread.join()
            self._thread = None
        with self._submitting:
            self._closed = True  # what is submitted from now on goes to the successor
            late = []
            while not self._pending.empty():
                late.append(self._pending.get_nowait())
                self._pending.task_done()
        for item in late:
            if successor is not None and item is not _STOP:
                successor.submit(*item)

    def submit(self, queue_id: str, result: Result, on_commit: Callable[[], None] | None = None) -> None:
        """WorkQueue.finish() on the writer thread, without waiting; on_commit runs after the commit.

        Until then the recipients stay active (leased), so nothing claims them again. A result
        that cannot be written is kept and written again until it is (see _commit).
        """
        with self._submitting:
            if not self._closed:
                self._pending.put((queue_id, result, on_commit))
                return
        # Closed: a delivery abandoned at a reload ended after all. Its result goes to the new
        # scheduler's writer (without one it is lost, and the lease's end retries the recipients).
        if self._successor is not None and self._successor.owner == self._work.owner:
            self._successor.submit(queue_id, result, on_commit)

    def flush(self) -> None:
        """Wait until everything submitted so far is committed (or has failed)."""
        self._pending.join()

    def unwritten(self) -> int:
        """Results kept in memory because they could not be written yet."""
        return len(self._unwritten)

    def backlogged(self) -> bool:
        """Too many results wait to be written: claim nothing more until some are."""
        return len(self._unwritten) >= MAX_UNWRITTEN

    def _run(self) -> None:
        began = 0.0
        while True:
            try:
                wait = max(0.0, self._retry_at - time.monotonic()) if self._unwritten else None
                batch = [self._pending.get(timeout=wait)]
            except queue.Empty:
                batch = []
            rest = began + SPACING - time.monotonic()
            if rest > 0 and batch and batch[-1] is not _STOP:
                time.sleep(rest)
            began = time.monotonic()
            with self._work._turn():
                self._write_batch(batch)
            if batch and batch[-1] is _STOP:
                if self._successor is not None and self._successor.owner == self._work.owner:
                    for entry in self._unwritten:  # in order; kept again there if still refused
                        self._successor.submit(*entry[0])
                    self._unwritten, self._held_ids = [], frozenset()
                self._last_tries()
                return

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
            with self._work._writing() as conn:
                now = self._work._clock()
                for queue_id, result, _ in items:
                    self._work._apply(conn, queue_id, result, now)
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
            self._work._log("results_error", qid=item[0], level=ERROR, error=str(exc)[:200],
                      kept="in memory, written again until it is", waiting=len(self._unwritten))

    def _salvage(self, item, exc: Exception, tries: int) -> bool:
        """A result the database refuses: its delivered outcomes win (written alone, so the
        message is not sent again); its other recipients are given back, due in ERROR_RETRY."""
        queue_id, result, on_commit = item
        due = self._work._clock() + ERROR_RETRY
        outcomes = [o if o.state == "delivered" else
                    Outcome(o.recipient_id, "deferred", f"result not recorded: {exc}"[:300],
                            next_attempt=due, counted=False)
                    for o in result.outcomes]
        released = [r.id if isinstance(r, Recipient) else r for r in result.release]
        outcomes += [Outcome(rid, "deferred", f"result not recorded: {exc}"[:300], next_attempt=due, counted=False)
                     for rid in released if rid not in {o.recipient_id for o in outcomes}]
        self._work._log("results_error", qid=queue_id, level=ERROR, error=str(exc)[:200],
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
                self._work._log("results_pending", qid=entry[0][0], level=WARNING,
                          waiting=len(self._unwritten), tries=entry[1] + 1, retry_in=round(self._retry_wait, 1))
                return
            self._unwritten.pop(0)
            self._held_ids = frozenset(rid for e in self._unwritten for rid in e[0][1].recipient_ids())
            if entry[1] > 0:  # it had failed (not merely waited behind one that had)
                self._work._log("results_written", qid=entry[0][0], level=WARNING, tries=entry[1] + 1,
                          waited=round(time.monotonic() - entry[2], 1), waiting=len(self._unwritten))
        self._retry_wait = RETRY_FIRST

    def _renew(self) -> None:
        """Extend the leases of the kept results' recipients (best effort: the database may
        refuse this write too), so no other process's recovery takes them while they wait."""
        ids = sorted(self._held_ids)
        if not ids:
            return
        try:
            with self._work._writing() as conn:
                now = self._work._clock()
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    conn.execute(
                        "UPDATE recipients SET lease_until = max(coalesce(lease_until, 0), ?)"
                        f" WHERE id IN ({','.join('?' * len(chunk))}) AND state = 'active' AND lease_owner = ?",
                        (now + self._work._lease, *chunk, self._work.owner))
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
            self._work._log("results_error", qid=queue_id, level=ERROR, tries=max(0, tries) + 1,
                      kept="lost at stop: its recipients are delivered again at the next start")
