import contextlib
import fcntl
import os
import sqlite3
import threading
import time

import pytest

from elemta.errors import QueueError, QueueFullError
from elemta.queue import db, ids, schema
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.store import Store
from tests.queue import stored

BODY = (
    b"Received: from client.example (client.example [192.0.2.7])\r\n\tby mx.example; now\r\n"
    b"Subject: hi\r\n\r\nbody\r\n"
)


def wait_for(condition, timeout=10.0, what="condition"):
    """Poll `condition` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        pause.wait(0.002)


def make(store, *rcpts, body=BODY, **kw):
    rcpts = rcpts or ("bob@Example.ORG",)
    return NewMessage(
        queue_id=kw.pop("queue_id", None) or store.new_id(),
        sender=kw.pop("sender", "alice@example.com"),
        recipients=tuple(NewRecipient(r) if isinstance(r, str) else r for r in rcpts),
        body=body,
        **kw,
    )


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "spool" / "queue.db")


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    s.open()
    yield s
    s.close()


def raw(path):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def write_locked(path):
    """Hold the database's write lock from another connection, stalling the writer in BEGIN IMMEDIATE."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


class Enqueuer(threading.Thread):
    """Runs store.enqueue(msg) in a thread and keeps the outcome."""

    def __init__(self, store, msg, timeout=30):
        super().__init__()
        self.store, self.msg, self.timeout = store, msg, timeout
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.result = self.store.enqueue(self.msg, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc

    def outcome(self):
        self.join(timeout=30)
        assert not self.is_alive(), "enqueue did not return"
        return self.error if self.error is not None else self.result


def stall_writer(store, path):
    """Lock the database and give the writer one message, so later requests pile up in its queue.

    Waits until the writer has gathered the blocker's batch and gone to write it (then it
    waits in BEGIN IMMEDIATE): what is enqueued after this returns cannot join that batch."""
    lock = write_locked(path)
    lock.__enter__()
    writing = threading.Event()
    write_batch = store._write_batch

    def noting(batch):
        writing.set()
        write_batch(batch)

    store._write_batch = noting
    blocker = Enqueuer(store, make(store, "blocker@example.net"))
    wait_for(writing.is_set, what="writer to take the blocker's batch")
    store._write_batch = write_batch
    return lock, blocker


def test_enqueue_then_read_back_every_field(store, db_path):
    body = BODY + bytes(range(256)) + b"\r\n"
    msg = make(
        store,
        NewRecipient("bob@Example.ORG", orcpt="rfc822;bob@example.org", notify=("SUCCESS", "FAILURE")),
        NewRecipient("postmaster"),
        body=body,
        sender="",
        priority="high",
        envid="ENV123",
        ret="HDRS",
        body_type="8BITMIME",
        smtputf8=True,
        requiretls=True,
        client_ip="192.0.2.7",
        client_helo="client.example",
        listener="submission",
        received_at=1_700_000_000.25,
    )
    assert store.enqueue(msg) == msg.queue_id
    row = stored.message(store.path, msg.queue_id)
    assert row == {
        "queue_id": msg.queue_id, "created": 1_700_000_000.25, "sender": "", "size": len(body),
        "priority": 1, "envid": "ENV123", "ret": "HDRS", "body_type": "8BITMIME", "smtputf8": 1,
        "client_ip": "192.0.2.7", "client_helo": "client.example", "listener": "submission", "recipients": 2, "done_at": None,
        "requiretls": 1,
    }
    assert stored.body(store.path, msg.queue_id) == body
    rcpts = stored.recipients(store.path, msg.queue_id)
    assert [(r["address"], r["domain"], r["orcpt"], r["notify"]) for r in rcpts] == [
        ("bob@Example.ORG", "example.org", "rfc822;bob@example.org", "SUCCESS,FAILURE"),
        ("postmaster", "", None, None),
    ]
    for r in rcpts:
        assert r["state"] == "queued" and r["priority"] == 1 and r["attempts"] == 0
        assert r["next_attempt"] == 1_700_000_000.25
        assert r["lease_owner"] is None and r["lease_until"] is None
    assert stored.message_count(store.path) == 1


def test_hold_and_priority(store):
    held = make(store, "a@x.example", "b@y.example", hold=True, priority="low")
    urgent = make(store, "c@z.example", priority="critical")
    store.enqueue(held)
    store.enqueue(urgent)
    assert {(r["state"], r["priority"]) for r in stored.recipients(store.path, held.queue_id)} == {("held", 3)}
    assert [(r["state"], r["priority"]) for r in stored.recipients(store.path, urgent.queue_id)] == [("queued", 0)]
    assert stored.message(store.path, "0000000000000") is None
    assert stored.body(store.path, "0000000000000") is None
    assert stored.recipients(store.path, "0000000000000") == []


def test_group_commit_batches_concurrent_sessions(store, db_path):
    threads, per_thread = 20, 50
    start = threading.Barrier(threads)
    issued = [[] for _ in range(threads)]
    errors = []

    def session(out):
        start.wait()
        try:
            for _ in range(per_thread):
                out.append(store.enqueue(make(store, "r@example.net")))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=session, args=(out,)) for out in issued]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not errors
    all_ids = [qid for out in issued for qid in out]
    total = threads * per_thread
    assert len(set(all_ids)) == total
    assert stored.message_count(store.path) == total
    conn = raw(db_path)
    assert conn.execute("SELECT count(*) FROM bodies").fetchone()[0] == total
    assert conn.execute("SELECT count(*) FROM recipients").fetchone()[0] == total
    stats = store.stats
    assert stats["messages"] == total
    assert stats["commits"] < total
    assert stats["largest_batch"] > 1
    assert schema.id_floor(conn) == max(all_ids)


@contextlib.contextmanager
def writers_lock_held(path):
    """Hold the writers' lock (db.writers_turn's flock) as another process's commit would."""
    fd = os.open(path + db.LOCK_SUFFIX, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_batch_is_gathered_when_the_writers_turn_comes(store, db_path):
    # While another process commits, this writer waits for the lock; what reaches it
    # meanwhile joins the batch it is about to write: one commit, not one for the first
    # message and another for the rest.
    done = []

    def session():
        done.append(store.enqueue(make(store)))

    with writers_lock_held(db_path):
        first = threading.Thread(target=session)
        first.start()
        wait_for(lambda: store._requests.qsize() == 0, what="the writer to take the first request")
        rest = [threading.Thread(target=session) for _ in range(4)]
        for t in rest:
            t.start()
        wait_for(lambda: store._requests.qsize() == 4, what="four more requests to wait")
        assert not done
    for t in [first, *rest]:
        t.join(10)
    assert len(done) == 5
    assert store.stats["commits"] == 1
    assert store.stats["largest_batch"] == 5


def test_failing_message_does_not_sink_its_batch(store, db_path):
    first = make(store, body=b"original\r\n")
    store.enqueue(first)
    lock, blocker = stall_writer(store, db_path)
    dup = Enqueuer(store, make(store, "dup@example.net", queue_id=first.queue_id, body=b"duplicate\r\n"))
    wait_for(lambda: store._requests.qsize() == 1)
    good = [Enqueuer(store, make(store, f"g{i}@example.net")) for i in range(5)]
    wait_for(lambda: store._requests.qsize() == 6, what="requests to pile up")
    lock.__exit__(None, None, None)

    assert isinstance(blocker.outcome(), str)
    err = dup.outcome()
    assert isinstance(err, QueueError) and not isinstance(err, QueueFullError)
    assert first.queue_id in str(err)
    for g in good:
        assert g.outcome() == g.msg.queue_id
        assert stored.message(store.path, g.msg.queue_id)["recipients"] == 1
    assert store.stats["split_batches"] >= 1
    assert store.stats["failed"] == 1
    # The original message is untouched and the failed copy left nothing behind.
    assert stored.body(store.path, first.queue_id) == b"original\r\n"
    assert [r["address"] for r in stored.recipients(store.path, first.queue_id)] == ["bob@Example.ORG"]
    assert stored.message_count(store.path) == 7


def test_disk_full_is_queue_full_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "q.db")
    with Store(path) as s:
        s.enqueue(make(s))
    pages = raw(path).execute("PRAGMA page_count").fetchone()[0]
    s = Store(path, max_page_count=pages + 8)  # room for a few KB more
    s.open()
    try:
        big = make(s, "a@example.net", "b@example.net", body=b"x" * (1 << 20))
        with pytest.raises(QueueFullError, match="full"):
            s.enqueue(big)
        assert stored.message(s.path, big.queue_id) is None
        conn = raw(path)
        assert conn.execute("SELECT count(*) FROM bodies").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM recipients").fetchone()[0] == 1
        assert conn.execute(
            "SELECT count(*) FROM bodies WHERE queue_id NOT IN (SELECT queue_id FROM messages)"
        ).fetchone()[0] == 0

        # The space the failed transaction would have used is free again.
        small = make(s)
        assert s.enqueue(small) == small.queue_id
        assert stored.body(s.path, small.queue_id) == BODY

        # In a batch, the oversized message fails alone.
        lock, blocker = stall_writer(s, path)
        big2 = Enqueuer(s, make(s, body=b"y" * (1 << 20)))
        small2 = Enqueuer(s, make(s))
        wait_for(lambda: s._requests.qsize() == 2)
        lock.__exit__(None, None, None)
        assert isinstance(blocker.outcome(), str)
        assert isinstance(big2.outcome(), QueueFullError)
        assert small2.outcome() == small2.msg.queue_id
    finally:
        s.close()


def test_intake_check_quota(tmp_path):
    path = str(tmp_path / "q.db")
    clock_now = [1_700_000_000.0]
    s = Store(path, max_messages=3, clock=lambda: clock_now[0])
    s.open()
    try:
        assert s.intake_check() is None
        first = make(s)
        s.enqueue(first)
        s.enqueue(make(s))
        assert s.intake_check() is None
        s.enqueue(make(s))
        # Still inside the cached second: the writer's commits since the snapshot count.
        assert s.intake_check() == "quota"
        clock_now[0] += 2
        assert s.intake_check() == "quota"  # and the fresh SQL count agrees
        # Delivered mail does not count against the quota.
        with raw(path) as conn:
            conn.execute("UPDATE recipients SET state = 'delivered' WHERE queue_id = ?", (first.queue_id,))
        assert s.intake_check() == "quota"  # cached
        clock_now[0] += 2
        assert s.intake_check() is None
    finally:
        s.close()


def test_intake_check_bytes_quota_and_disk(tmp_path):
    with Store(str(tmp_path / "a.db"), max_bytes=2 * len(BODY)) as s:
        s.enqueue(make(s))
        assert s.intake_check() is None
        s.enqueue(make(s))
        assert s.intake_check() == "quota"
    with Store(str(tmp_path / "b.db"), min_free_bytes=1 << 62) as s:
        assert s.intake_check() == "disk"
    with Store(str(tmp_path / "c.db"), min_free_bytes=1) as s:
        assert s.intake_check() is None


def test_close_flushes_pending_and_refuses_new(store, db_path):
    lock, blocker = stall_writer(store, db_path)
    pending = [Enqueuer(store, make(store)) for _ in range(10)]
    wait_for(lambda: store._requests.qsize() == 10, what="requests to pile up")
    closer = threading.Thread(target=store.close)
    closer.start()
    wait_for(lambda: not store._accepting, what="close() to stop intake")
    with pytest.raises(QueueError, match="closed"):
        store.enqueue(make(store))
    lock.__exit__(None, None, None)
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert isinstance(blocker.outcome(), str)
    assert all(p.outcome() == p.msg.queue_id for p in pending)
    with pytest.raises(QueueError):
        store.enqueue(make(store))
    store.close()  # idempotent
    assert raw(db_path).execute("SELECT count(*) FROM messages").fetchone()[0] == 11
    assert not any(t.name == "queue-writer" and t.is_alive() for t in threading.enumerate())


def test_timed_out_enqueue_is_never_written(store, db_path):
    lock, blocker = stall_writer(store, db_path)
    late = make(store)
    with pytest.raises(QueueError, match="not stored"):
        store.enqueue(late, timeout=0.05)
    lock.__exit__(None, None, None)
    assert isinstance(blocker.outcome(), str)
    store.enqueue(make(store))  # the writer has moved past the cancelled request
    assert stored.message(store.path, late.queue_id) is None
    assert stored.message_count(store.path) == 2


def test_dead_writer_fails_sessions_instead_of_hanging(db_path):
    # One request per batch: the writer holds the blocker alone, whenever it took it, so the
    # poison and the victim are still queued behind it (batches are gathered in the writer's
    # turn, and a larger batch could take them in with the blocker).
    store = Store(db_path, batch_max=1)
    store.open()
    lock, blocker = stall_writer(store, db_path)
    store._requests.put(object())  # not a request: the writer thread dies on it
    victim = Enqueuer(store, make(store), timeout=None)  # queued behind the poison
    wait_for(lambda: store._requests.qsize() == 2)
    lock.__exit__(None, None, None)
    assert isinstance(blocker.outcome(), str)
    assert isinstance(victim.outcome(), QueueError)
    wait_for(lambda: not store._writer.is_alive(), what="writer to die")
    with pytest.raises(QueueError, match="writer stopped"):
        store.enqueue(make(store))
    store.close()


def test_reopen_keeps_data_orders_ids_and_recovers_active(db_path):
    with Store(db_path) as s:
        old = [s.enqueue(make(s, "a@example.net", "b@example.net")) for _ in range(3)]
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION == 6
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(
        "UPDATE recipients SET state = 'active', lease_owner = 'x', lease_until = ? WHERE queue_id = ?",
        (time.time() + 3600, old[0]),
    )
    # A high-water mark beyond every message (e.g. the newest was delivered and deleted).
    future = ids.encode((int((time.time() + 3600) * 1e6) << 10) | 2)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'last_queue_id'", (future,))
    conn.close()

    with Store(db_path) as s:
        assert s.stats["recovered"] == 2
        assert {r["state"] for r in stored.recipients(s.path, old[0])} == {"queued"}
        assert all(r["lease_owner"] is None for r in stored.recipients(s.path, old[0]))
        assert stored.message_count(s.path) == 3
        assert stored.body(s.path, old[2]) == BODY
        new = s.new_id()
        assert new > future > max(old)
        assert s.enqueue(make(s, queue_id=new)) == new


def test_deleted_messages_leave_their_ids_as_the_high_water_mark(db_path):
    with Store(db_path) as s:
        old = [s.enqueue(make(s)) for _ in range(3)]
    conn = raw(db_path)
    # Storing mail leaves meta alone (one WAL frame fewer per commit) ...
    assert conn.execute("SELECT value FROM meta WHERE key = 'last_queue_id'").fetchone()[0] == ""
    # ... and deleting, however it is done, remembers the highest ID deleted.
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("DELETE FROM messages WHERE queue_id = ?", (old[2],))
    conn.execute("DELETE FROM messages WHERE queue_id = ?", (old[0],))
    assert conn.execute("SELECT value FROM meta WHERE key = 'last_queue_id'").fetchone()[0] == old[2]
    conn.execute("DELETE FROM messages")
    assert conn.execute("SELECT value FROM meta WHERE key = 'last_queue_id'").fetchone()[0] == old[2]
    conn.close()
    with Store(db_path) as s:
        assert s.new_id() > old[2]


def test_expired_leases_only_when_not_recover_all(db_path):
    with Store(db_path) as s:
        a, b = s.enqueue(make(s)), s.enqueue(make(s))
    with raw(db_path) as conn:
        activate = "UPDATE recipients SET state = 'active', lease_until = ? WHERE queue_id = ?"
        conn.execute(activate, (time.time() - 5, a))  # lease ran out: the holder died
        conn.execute(activate, (time.time() + 600, b))  # another process is still delivering it
    s = Store(db_path)
    s.open(recover_all=False)
    try:
        assert stored.recipients(s.path, a)[0]["state"] == "queued"
        assert stored.recipients(s.path, b)[0]["state"] == "active"
    finally:
        s.close()


def test_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "new.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    s = Store(path)
    with pytest.raises(QueueError, match=r"version 99.*newer"):
        s.open()
    s.close()
    assert raw(path).execute("PRAGMA user_version").fetchone()[0] == 99


def test_misuse_is_reported(tmp_path):
    s = Store(str(tmp_path / "q.db"))
    with pytest.raises(QueueError, match="not open"):
        s.new_id()
    s.open()
    with pytest.raises(QueueError, match="malformed"):
        s.enqueue(make(s, queue_id="not-an-id"))
    with pytest.raises(QueueError, match="already open"):
        s.open()
    late = make(s)
    s.close()
    with pytest.raises(QueueError):
        s.enqueue(late)


def _open_and_close(path, barrier, results):
    barrier.wait()
    store = Store(path)
    try:
        store.open(recover_all=False)
        store.close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        results.put(repr(exc))


def test_processes_opening_a_new_database_together(tmp_path):
    """server.workers: several processes create the same new database at once; SQLite does
    not wait on its busy timeout for the switch to WAL, so db.connect must."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for attempt in range(4):
        path = str(tmp_path / f"q{attempt}.db")
        barrier, results = ctx.Barrier(5), ctx.Queue()
        procs = [ctx.Process(target=_open_and_close, args=(path, barrier, results)) for _ in range(5)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
        assert outcomes == ["ok"] * 5


def test_the_scheduler_is_woken_for_new_mail_but_not_for_held_mail(store):
    woken = []
    store.on_commit = lambda: woken.append(1)
    store.enqueue(make(store, hold=True))  # nothing for delivery to do (delivery.hold, a quarantine)
    store.enqueue(make(store))
    store.close()  # the writer has finished: every wake-up it gave is in
    assert woken == [1]


# ---- submit(): the event loop's enqueue (smtp/loop.py) -------------------------------------------


def test_submit_calls_back_in_the_writer_thread_after_the_commit(store, db_path):
    outcomes: list = []
    done = threading.Event()

    def callback(request):
        outcomes.append((request.error, threading.current_thread() is not threading.main_thread(),
                         stored.message(db_path, request.msg.queue_id) is not None))
        done.set()

    msg = make(store)
    store.submit(msg, callback)
    assert done.wait(10)
    error, in_writer, was_stored = outcomes[0]
    assert error is None and in_writer and was_stored


def test_a_submitted_request_cancelled_before_the_writer_takes_it_is_never_stored(store, db_path, monkeypatch):
    gate, in_commit = threading.Event(), threading.Event()
    original = Store._commit

    def stuck(self, batch):
        in_commit.set()
        gate.wait(10)
        return original(self, batch)

    monkeypatch.setattr(Store, "_commit", stuck)
    called: list = []
    first = store.submit(make(store), called.append)
    assert in_commit.wait(10)
    second = store.submit(make(store), called.append)
    assert second.cancel() is True  # not taken yet: given up
    assert first.cancel() is False  # the writer has it: its commit decides
    gate.set()
    wait_for(lambda: len(called) == 1, what="the first request's callback")
    assert called[0] is first and first.error is None
    assert stored.message(db_path, first.msg.queue_id) is not None
    assert stored.message(db_path, second.msg.queue_id) is None


def test_submit_to_a_closed_store_fails_at_once(db_path):
    s = Store(db_path)
    s.open()
    msg = make(s)
    s.close()
    with pytest.raises(QueueError, match="closed"):
        s.submit(msg, lambda request: None)


def test_a_callback_that_raises_does_not_stop_the_writer(store, db_path):
    def broken(request):
        raise RuntimeError("a caller's bug")

    store.submit(make(store), broken)
    assert store.enqueue(make(store))  # the writer is still there
