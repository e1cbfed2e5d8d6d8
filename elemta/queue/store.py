"""The durable message queue: group-committed intake and simple reads.

Sessions never take the SQLite write lock. Store.enqueue() hands the message
to one writer thread and blocks; the writer takes every request waiting at
that moment (up to batch_max), writes them in a single BEGIN IMMEDIATE ...
COMMIT with synchronous=FULL, so one fsync covers the whole batch, and only
then wakes the sessions. A session therefore says 250 only for mail that is
on disk, while the number of fsyncs grows with load far slower than the
number of messages.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from elemta import metrics
from elemta.errors import QueueError, QueueFullError
from elemta.queue import db, ids, schema
from elemta.queue.intake import IntakeLimits
from elemta.queue.model import NewMessage

_STOP = object()  # immutable sentinel telling the writer to finish up
_READER_POOL_MAX = 8  # idle read connections kept; more concurrent readers just open their own
_WAIT_SLICE = 1.0  # how often a waiting session re-checks that the writer is alive


class _Request:
    """One enqueue waiting for the writer: the message, the outcome, and how it is told.

    A request is taken by the writer or cancelled by its timed-out session,
    never both, so a message reported as "not stored" is never written later.
    Only enqueue() waits on an Event; the loop's submit() is told by its callback, so a
    request made there carries no Event (and no lock of its own: `_STATE` guards the
    move of every request, held for two comparisons).
    """

    __slots__ = ("_state", "callback", "done", "error", "finished", "msg")

    def __init__(self, msg: NewMessage, callback: Callable[[_Request], None] | None = None) -> None:
        self.msg = msg
        self.done = threading.Event() if callback is None else None  # enqueue() waits on it
        self.finished = False
        self.error: BaseException | None = None
        self.callback = callback  # submit()'s: called in the writer thread with the outcome
        self._state = "pending"

    def _move(self, to: str) -> bool:
        with _STATE:
            if self._state != "pending":
                return False
            self._state = to
            return True

    def take(self) -> bool:
        return self._move("taken")

    def cancel(self) -> bool:
        return self._move("cancelled")

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self.finished = True
        if self.done is not None:
            self.done.set()
        callback, self.callback = self.callback, None
        if callback is not None and self._state != "cancelled":  # a cancelled one was given up
            with contextlib.suppress(Exception):  # a caller's bug must not stop the writer of all
                callback(self)


_STATE = threading.Lock()  # the moves of every _Request (take or cancel, never both)


class Store:
    def __init__(
        self,
        path: str,
        *,
        batch_max: int = 256,
        min_free_bytes: int = 0,
        max_messages: int = 0,
        max_bytes: int = 0,
        worker: int = 0,
        clock: Callable[[], float] = time.time,
        max_page_count: int | None = None,  # test hook: caps the database to simulate a full disk
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if not 0 <= worker <= ids.MAX_WORKER:
            raise ValueError(f"worker must be 0..{ids.MAX_WORKER}")
        self.path = path
        self._batch_max = batch_max
        self._worker = worker
        self._clock = clock
        self._max_page_count = max_page_count

        # _lock guards _state and _accepting, and makes "check accepting, then
        # put" atomic so nothing can be queued after the writer's last drain.
        self._lock = threading.Lock()
        self._state = "new"  # new -> open -> closed
        self._accepting = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._wconn: sqlite3.Connection | None = None
        self._ids: ids.IdGenerator | None = None

        self._pool_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []

        # Written by the writer thread only; _stats_lock makes copies consistent.
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("commits", "messages", "failed", "split_batches", "largest_batch", "recovered"), 0
        )
        # (messages, bytes) this Store has committed: only a delta base for intake_check.
        self._committed = (0, 0)
        self._limits = IntakeLimits(path, min_free_bytes=min_free_bytes, max_messages=max_messages,
                                    max_bytes=max_bytes, clock=clock, committed=self._committed_totals,
                                    count_undelivered=self._count_undelivered)
        # Called by the writer after each commit of new mail that is not held: the delivery
        # scheduler's wake-up, so the first attempt starts at once instead of at the next poll.
        self.on_commit: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------

    def open(self, *, recover_all: bool = True) -> None:
        """Create/upgrade the database, recover abandoned work, start the writer.

        recover_all=True returns every 'active' recipient to 'queued', which is
        right when this process is the only one using the database (nothing can
        be in flight at start-up). Processes sharing a database pass False so
        only recipients whose lease has expired are recovered.
        """
        with self._lock:
            if self._state != "new":
                raise QueueError(f"queue store {self.path} is already {self._state}; use a new Store to reopen")
            parent = os.path.dirname(os.path.abspath(self.path))
            conn = None
            try:
                os.makedirs(parent, exist_ok=True)
                conn = db.connect(self.path, check_same_thread=False)  # handed to the writer thread
                conn.execute("PRAGMA cache_size = -32768")
                if self._max_page_count is not None:
                    conn.execute(f"PRAGMA max_page_count = {int(self._max_page_count)}")
                schema.migrate(conn)
                self._recover(conn, recover_all)
                self._ids = ids.IdGenerator(self._worker, schema.id_floor(conn), clock=self._clock)
            except (OSError, sqlite3.Error) as exc:
                if conn is not None:
                    conn.close()
                raise QueueError(f"cannot open queue database {self.path}: {exc}") from exc
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            self._wconn = conn
            self._writer = threading.Thread(target=self._run, name="queue-writer", daemon=False)
            self._state = "open"
            self._accepting = True
            self._writer.start()

    def close(self) -> None:
        """Refuse new enqueues, let the writer commit everything already queued, then shut down."""
        with self._lock:
            state, self._state = self._state, "closed"
            if state == "open":
                self._accepting = False
                self._requests.put(_STOP)  # behind every accepted request: FIFO
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        if state != "open":
            return  # never opened, or another caller is doing / did the rest
        with self._pool_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        if self._wconn is not None:
            self._wconn.close()

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _recover(self, conn: sqlite3.Connection, recover_all: bool) -> None:
        with db.write(conn):
            recovered = schema.release_active(conn, self._clock(), expired_only=not recover_all)
        with self._stats_lock:
            self._stats["recovered"] = recovered

    # -- intake --------------------------------------------------------------

    def new_id(self) -> str:
        if self._ids is None:
            raise QueueError("queue store is not open")
        return self._ids.next()

    def enqueue(self, msg: NewMessage, timeout: float | None = 60) -> str:
        """Store `msg` durably; return its queue_id once the transaction has committed.

        Raises QueueFullError when the database or disk is full, QueueError for
        any other failure (closed store, stopped writer, timeout, constraint
        violation); in every error case nothing of the message was kept.
        """
        req = self._put(msg)
        done = req.done
        assert done is not None  # made without a callback: it has its Event
        writer = self._writer
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.is_set():
            remaining = _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
            if remaining <= 0:
                if req.cancel():
                    raise QueueError(f"timed out after {timeout}s waiting for the queue writer; "
                                     "message not stored")
                # The writer already has it: its transaction decides the outcome, so
                # wait for that rather than report a failure for mail that commits.
                if not done.wait(timeout):
                    raise QueueError("timed out waiting for the queue writer's commit; outcome unknown")
                break
            writer_gone = writer is not None and not writer.is_alive()
            # The writer fails everything left before it exits; this is a backstop.
            if not done.wait(remaining) and writer_gone and not done.is_set():
                raise QueueError(self._not_accepting_reason())
        if req.error is not None:
            raise req.error
        return msg.queue_id

    def submit(self, msg: NewMessage, callback: Callable[[_Request], None]) -> _Request:
        """enqueue() without waiting, for the event loop (smtp/loop.py): the same group commit,
        and callback(request) runs in the writer thread once the transaction has committed
        (request.error None) or failed (request.error the QueueError).  No timeout of its own:
        a caller that gives up calls request.cancel(), and only if that returns True was the
        message not taken (then the callback never runs).  QueueError at once when the store
        does not accept mail."""
        return self._put(msg, callback)

    def _put(self, msg: NewMessage, callback: Callable[[_Request], None] | None = None) -> _Request:
        """Hand msg to the writer: its request, or QueueError when mail is not taken now."""
        if not isinstance(msg, NewMessage):
            raise TypeError("the queue takes a NewMessage")
        if not ids.is_valid(msg.queue_id):
            raise QueueError(f"malformed queue ID {msg.queue_id!r}; use Store.new_id()")
        req = _Request(msg, callback)
        with self._lock:
            if not self._accepting:
                raise QueueError(self._not_accepting_reason())
            self._requests.put(req)
        return req

    def _not_accepting_reason(self) -> str:
        if self._writer_error is not None:
            return f"queue writer stopped: {self._writer_error!r}"
        return "queue store is not open" if self._state == "new" else "queue store is closed"

    def set_limits(
        self, *, min_free_bytes: int, max_messages: int, max_bytes: int, batch_max: int | None = None
    ) -> None:
        """New intake limits (a config reload); they apply from the next intake_check."""
        if batch_max is not None:
            self._batch_max = batch_max
        self._limits.set(min_free_bytes=min_free_bytes, max_messages=max_messages, max_bytes=max_bytes)

    def intake_check(self) -> str | None:
        """None if new mail may be accepted, else 'disk' or 'quota' (queue.intake)."""
        return self._limits.check()

    def _committed_totals(self) -> tuple[int, int]:
        with self._stats_lock:
            return self._committed

    def _count_undelivered(self) -> tuple[int, int]:
        with self._reader() as conn:
            return schema.undelivered_totals(conn)

    @property
    def stats(self) -> dict[str, int]:
        """A copy of the writer's counters (commits = transactions that committed)."""
        with self._stats_lock:
            return dict(self._stats)

    # -- the writer thread ---------------------------------------------------

    def _run(self) -> None:
        batch: list = []
        try:
            stop = False
            while not stop:
                first = self._requests.get()
                if first is _STOP:
                    break
                batch = [first]
                assert self._wconn is not None
                # The batch is gathered once this writer's turn has come (db.writers_turn):
                # what arrived while another process committed joins it.
                with db.writers_turn(self._wconn):
                    # Take what is already waiting, without waiting for more: under light
                    # load a message is written at once, under heavy load the batch grows
                    # by itself while the previous fsync, or another writer's, runs.
                    # (empty() first, not get_nowait()'s Empty: this thread is the only taker,
                    # and an exception per batch costs more than the look.)
                    requests = self._requests
                    while len(batch) < self._batch_max and not requests.empty():
                        item = requests.get_nowait()
                        if item is _STOP:
                            stop = True
                            break
                        batch.append(item)
                    batch = [req for req in batch if req.take()]
                    if batch:
                        self._write_batch(batch)
                batch = []
        except BaseException as exc:  # noqa: BLE001 -- a bug or a broken connection: stop, but strand nobody
            self._writer_error = exc
        finally:
            with self._lock:
                self._accepting = False
            # Nothing can be queued any more; fail what is in hand and what is left.
            while True:
                try:
                    batch.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                if isinstance(item, _Request) and not item.finished:
                    item.take()
                    item.finish(QueueError(self._not_accepting_reason()))

    def _write_batch(self, batch: list[_Request]) -> None:
        batch = self._room_for(batch)
        if not batch:
            return
        try:
            try:
                began = time.monotonic()
                self._commit(batch)
                metrics.COMMIT_SECONDS.observe(time.monotonic() - began)
                metrics.COMMIT_BATCH.observe(len(batch))
            except Exception as exc:  # noqa: BLE001 -- any failure is reported to its sessions
                if len(batch) == 1:
                    batch[0].finish(self._error_for(batch[0].msg, exc))
                    return
                # Something in the batch failed and the whole transaction rolled
                # back. Retry one message per transaction so only the culprit fails.
                with self._stats_lock:
                    self._stats["split_batches"] += 1
                for req in batch:
                    try:
                        self._commit([req])
                    except Exception as exc1:  # noqa: BLE001 -- reported to that session
                        req.finish(self._error_for(req.msg, exc1))
                    else:
                        req.finish(None)
            else:
                for req in batch:
                    req.finish(None)
            # Held mail (delivery.hold, a quarantine) is nothing for the scheduler to do: waking it
            # for every held message cost the delivery process a tenth of a core at 1,600 msgs/s.
            if self.on_commit is not None and any(not req.msg.hold for req in batch):
                self.on_commit()
        finally:
            for req in batch:  # only reached unfinished if the writer itself is dying
                if not req.finished:
                    req.finish(QueueError("queue writer stopped before committing the message"))

    def _room_for(self, batch: list[_Request]) -> list[_Request]:
        """The requests the disk has room for above queue.min_free_space, in order; the others
        fail at once with QueueFullError (452 4.3.1).  Checked before each commit, on the file
        system's own free space: MAIL's check cannot see the messages still in transfer."""
        room = self._limits.room()
        if room is None:
            return batch
        fits: list[_Request] = []
        for req in batch:
            need = self._limits.need(len(req.msg.body))
            if need <= room:
                room -= need
                fits.append(req)
            else:
                with self._stats_lock:
                    self._stats["failed"] += 1
                req.finish(QueueFullError(
                    f"disk space below queue.min_free_space; message {req.msg.queue_id} not stored"))
        return fits

    def _commit(self, batch: list[_Request]) -> None:
        conn = self._wconn
        assert conn is not None
        msgs = [req.msg for req in batch]
        with db.write(conn):
            nbytes = schema.insert_messages(conn, msgs, self._clock())
        with self._stats_lock:
            self._stats["commits"] += 1
            self._stats["messages"] += len(batch)
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(batch))
            done_messages, done_bytes = self._committed
            self._committed = (done_messages + len(batch), done_bytes + nbytes)

    def _error_for(self, msg: NewMessage, exc: BaseException) -> QueueError:
        with self._stats_lock:
            self._stats["failed"] += 1
        # Each waiting session gets its own exception object: one instance raised
        # in several threads would collect their tracebacks.
        code = getattr(exc, "sqlite_errorcode", None) or 0  # may be an extended code: compare the low byte
        if isinstance(exc, sqlite3.Error) and code & 0xFF == sqlite3.SQLITE_FULL:
            self._limits.forget()  # the next intake_check counts the queue again (the disk it reads each time)
            err: QueueError = QueueFullError(f"queue database is full; message {msg.queue_id} not stored: {exc}")
        elif isinstance(exc, sqlite3.IntegrityError):
            err = QueueError(f"message {msg.queue_id} rejected by the queue database: {exc}")
        else:
            err = QueueError(f"could not store message {msg.queue_id}: {exc}")
        err.__cause__ = exc
        return err

    # -- reads ---------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A query_only connection from a small pool, for the duration of one read.

        Pooled connections move between threads (never used by two at once),
        hence check_same_thread=False; close() closes the idle ones.
        """
        with self._pool_lock:
            if self._state != "open":
                raise QueueError("queue store is not open")
            conn = self._readers.pop() if self._readers else None
        try:
            if conn is None:
                conn = db.connect(self.path, readonly=True, check_same_thread=False)
                conn.row_factory = sqlite3.Row
            yield conn
        except sqlite3.Error as exc:
            raise QueueError(f"queue database read failed: {exc}") from exc
        finally:
            if conn is not None:
                with self._pool_lock:
                    if self._state == "open" and len(self._readers) < _READER_POOL_MAX:
                        self._readers.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
