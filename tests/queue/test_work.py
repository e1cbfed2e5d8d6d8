"""elemta.queue.work: claiming due recipients and recording outcomes, on a real SQLite file."""

import sqlite3
import time

import pytest

from elemta.errors import QueueError
from elemta.queue import schema
from elemta.queue.jobs import Attempt, Job, Outcome, Recipient, Result
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.store import Store
from elemta.queue.work import CANDIDATES, CLAIM, EARLIEST, WorkQueue
from tests.queue import stored
from tests.queue.conftest import OTHER, OWNER, T0, open_work

BODY = b"Subject: hi\r\n\r\nbody\r\n"


def enqueue(store, *rcpts, **kw):
    msg = NewMessage(
        queue_id=kw.pop("queue_id", None) or store.new_id(),
        sender=kw.pop("sender", "alice@example.com"),
        recipients=tuple(NewRecipient(r) if isinstance(r, str) else r for r in rcpts or ("bob@example.org",)),
        body=kw.pop("body", BODY),
        **kw,
    )
    return store.enqueue(msg)


def rows(raw, queue_id):
    return [dict(r) for r in raw.execute("SELECT * FROM recipients WHERE queue_id = ? ORDER BY id", (queue_id,))]


def row(raw, recipient_id):
    return dict(raw.execute("SELECT * FROM recipients WHERE id = ?", (recipient_id,)).fetchone())


def message(raw, queue_id):
    found = raw.execute("SELECT * FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    return dict(found) if found else None


def count(raw, table, queue_id):
    return raw.execute(f"SELECT count(*) FROM {table} WHERE queue_id = ?", (queue_id,)).fetchone()[0]


def claim_one(work, lease=600.0):
    (job,) = work.claim(100, lease)
    return job


# -- claim -----------------------------------------------------------------------------------


def test_claim_leases_due_recipients_and_groups_them_by_message(store, work, raw, clock):
    first = enqueue(
        store,
        NewRecipient("bob@Example.ORG", orcpt="rfc822;bob@example.org", notify=("SUCCESS", "FAILURE")),
        "carol@example.net",
        sender="", priority="high", envid="ENV1", ret="HDRS", body_type="8BITMIME", smtputf8=True,
    )
    clock.advance(1)
    second = enqueue(store, "dave@example.com", requiretls=True)
    clock.advance(1)
    jobs = work.claim(10, 600.0)
    a, b = (r["id"] for r in rows(raw, first))
    (c,) = (r["id"] for r in rows(raw, second))
    assert jobs == [
        Job(first, T0, "", len(BODY), 1, "ENV1", "HDRS", "8BITMIME", True, (
            Recipient(a, "bob@Example.ORG", "example.org", "rfc822;bob@example.org", ("SUCCESS", "FAILURE"), 0, False),
            Recipient(b, "carol@example.net", "example.net", None, (), 0, False),
        )),
        Job(second, T0 + 1, "alice@example.com", len(BODY), 2, None, None, "7BIT", False, (
            Recipient(c, "dave@example.com", "example.com", None, (), 0, False),
        ), requiretls=True),
    ]
    for r in rows(raw, first) + rows(raw, second):
        assert (r["state"], r["lease_owner"], r["lease_until"], r["updated"]) == ("active", OWNER, T0 + 602, T0 + 2)


def test_claim_takes_the_most_urgent_then_the_oldest_within_the_limit(store, work, clock):
    low = enqueue(store, priority="low")
    clock.advance(1)
    normal_old = enqueue(store)
    clock.advance(1)
    normal_new = enqueue(store)
    clock.advance(1)
    critical = enqueue(store, priority="critical")
    clock.advance(1)
    assert [j.queue_id for j in work.claim(1, 60)] == [critical]
    assert [j.queue_id for j in work.claim(2, 60)] == [normal_old, normal_new]
    assert [j.queue_id for j in work.claim(5, 60)] == [low]
    assert work.claim(5, 60) == []


def test_claim_limit_counts_recipients_not_messages(store, work, raw):
    queue_id = enqueue(store, "a@example.org", "b@example.org", "c@example.org")
    (job,) = work.claim(2, 60)
    assert [r.address for r in job.recipients] == ["a@example.org", "b@example.org"]
    assert [r["state"] for r in rows(raw, queue_id)] == ["active", "active", "queued"]
    assert [r.address for r in claim_one(work).recipients] == ["c@example.org"]


def test_claim_orders_deferred_recipients_by_when_they_are_due(store, work, clock):
    a = enqueue(store, "a@example.org")
    b = enqueue(store, "b@example.org")
    jobs = {j.queue_id: j for j in work.claim(10, 60)}
    work.finish(a, Result([Outcome(jobs[a].recipients[0].id, "deferred", "451 later", next_attempt=T0 + 200)]))
    work.finish(b, Result([Outcome(jobs[b].recipients[0].id, "deferred", "451 later", next_attempt=T0 + 100)]))
    clock.advance(300)
    assert [j.queue_id for j in work.claim(1, 60)] == [b]


def test_claim_skips_held_and_not_yet_due_recipients(store, work, clock):
    enqueue(store, "held@example.org", hold=True)
    deferred = enqueue(store, "later@example.org")
    job = claim_one(work)
    work.finish(deferred, Result([Outcome(job.recipients[0].id, "deferred", "451 4.4.1 no answer",
                                          next_attempt=T0 + 300)]))
    assert work.claim(10, 60) == []
    clock.advance(299.9)
    assert work.claim(10, 60) == []
    clock.advance(0.1)
    (again,) = work.claim(10, 60)
    assert again.queue_id == deferred
    assert again.recipients[0].attempts == 1
    assert work.claim(10, 60) == []  # the held one never


def test_leased_recipients_are_not_claimed_again_by_anyone(store, work, other):
    enqueue(store, "a@example.org", "b@example.org")
    assert len(claim_one(work).recipients) == 2
    assert work.claim(10, 60) == []
    assert other.claim(10, 60) == []


def test_claim_with_nothing_queued_returns_no_jobs(work):
    assert work.claim(10, 60) == []


def test_body_returns_the_stored_message(store, work):
    queue_id = enqueue(store, body=BODY + bytes(range(256)))
    assert work.body(queue_id) == BODY + bytes(range(256))
    assert work.body("0000000000000") is None


# -- finish ----------------------------------------------------------------------------------


def test_finish_all_delivered_closes_the_message_and_drops_the_body(store, work, raw, clock):
    queue_id = enqueue(store, "a@example.org", "b@example.org")
    job = claim_one(work)
    clock.advance(5)
    work.finish(queue_id, Result([Outcome(r.id, "delivered") for r in job.recipients]))
    for r in rows(raw, queue_id):
        assert (r["state"], r["last_error"], r["attempts"], r["lease_until"], r["lease_owner"], r["updated"]) == (
            "delivered", None, 1, None, None, T0 + 5)
    assert message(raw, queue_id)["done_at"] == T0 + 5
    assert work.body(queue_id) is None
    assert work.next_due() is None


def test_finish_with_a_deferred_recipient_keeps_the_message_open(store, work, raw, clock):
    queue_id = enqueue(store, "a@example.org", "b@example.org")
    a, b = claim_one(work).recipients
    clock.advance(5)
    work.finish(queue_id, Result([
        Outcome(a.id, "delivered"),
        Outcome(b.id, "deferred", "451 4.3.0 try later", next_attempt=T0 + 305, warned=True),
    ]))
    got = row(raw, b.id)
    assert (got["state"], got["last_error"], got["next_attempt"], got["attempts"], got["warned"]) == (
        "deferred", "451 4.3.0 try later", T0 + 305, 1, 1)
    assert (got["lease_until"], got["lease_owner"]) == (None, None)
    assert row(raw, a.id)["state"] == "delivered"
    assert message(raw, queue_id)["done_at"] is None
    assert work.body(queue_id) == BODY
    assert work.next_due() == T0 + 305


def test_finish_counts_attempts_and_keeps_the_warned_flag(store, work, raw, clock):
    queue_id = enqueue(store)
    for n in range(1, 4):
        (rcpt,) = claim_one(work).recipients
        assert rcpt.attempts == n - 1
        assert rcpt.warned is (n > 2)
        work.finish(queue_id, Result([Outcome(rcpt.id, "deferred", f"try {n}", next_attempt=clock() + 10,
                                              warned=n == 2)]))
        clock.advance(10)
    got = rows(raw, queue_id)[0]
    assert (got["attempts"], got["warned"], got["last_error"]) == (3, 1, "try 3")


def test_finish_held_outcome_parks_the_recipient(store, work, raw):
    queue_id = enqueue(store)
    (rcpt,) = claim_one(work).recipients
    work.finish(queue_id, Result([Outcome(rcpt.id, "held", "held by transport map")]))
    assert row(raw, rcpt.id)["state"] == "held"
    assert work.claim(10, 60) == []
    assert message(raw, queue_id)["done_at"] is None


def test_finish_writes_attempt_rows(store, work, raw):
    queue_id = enqueue(store, "a@example.org", "b@example.org")
    a, b = claim_one(work).recipients
    work.finish(queue_id, Result(
        outcomes=[Outcome(a.id, "delivered"), Outcome(b.id, "deferred", "421 busy", next_attempt=T0 + 60)],
        attempts=[
            Attempt(a.id, T0 + 1, "delivered", reply="250 2.0.0 Ok: queued as X", host="mx1.example.org",
                    ip="192.0.2.25", port=25, tls="TLSv1.3", duration=1.25),
            Attempt(b.id, T0 + 2, "deferred"),
        ],
    ))
    got = [dict(r) for r in raw.execute(
        "SELECT recipient_id, queue_id, at, host, ip, port, tls, duration, outcome, reply FROM attempts ORDER BY id")]
    assert got == [
        {"recipient_id": a.id, "queue_id": queue_id, "at": T0 + 1, "host": "mx1.example.org", "ip": "192.0.2.25",
         "port": 25, "tls": "TLSv1.3", "duration": 1.25, "outcome": "delivered", "reply": "250 2.0.0 Ok: queued as X"},
        {"recipient_id": b.id, "queue_id": queue_id, "at": T0 + 2, "host": None, "ip": None,
         "port": None, "tls": None, "duration": 0.0, "outcome": "deferred", "reply": None},
    ]


def test_finish_failure_enqueues_its_bounce_and_closes_the_message(store, work, raw, clock):
    queue_id = enqueue(store, "nobody@example.org")
    (rcpt,) = claim_one(work).recipients
    bounce = NewMessage(store.new_id(), "", (NewRecipient("alice@example.com"),), b"Subject: failure\r\n\r\nx\r\n",
                        priority="high")
    clock.advance(3)
    work.finish(queue_id, Result(
        outcomes=[Outcome(rcpt.id, "failed", "550 5.1.1 no such user")],
        attempts=[Attempt(rcpt.id, T0 + 3, "failed", reply="550 5.1.1 no such user")],
        reports=[bounce],
    ))
    got = row(raw, rcpt.id)
    assert (got["state"], got["last_error"], got["attempts"]) == ("failed", "550 5.1.1 no such user", 1)
    assert message(raw, queue_id)["done_at"] == T0 + 3
    assert work.body(queue_id) is None
    report = message(raw, bounce.queue_id)
    assert (report["sender"], report["priority"], report["created"], report["done_at"]) == ("", 1, T0 + 3, None)
    assert [(r["address"], r["state"], r["next_attempt"]) for r in rows(raw, bounce.queue_id)] == [
        ("alice@example.com", "queued", T0 + 3)]
    assert work.body(bounce.queue_id) == bounce.body
    assert [j.queue_id for j in work.claim(10, 60)] == [bounce.queue_id]


def test_finish_is_one_transaction_a_failing_report_undoes_everything(store, work, raw):
    queue_id = enqueue(store)
    (rcpt,) = claim_one(work).recipients
    clash = NewMessage(queue_id, "", (NewRecipient("alice@example.com"),), b"x\r\n")  # same queue_id: rejected
    with pytest.raises(QueueError):
        work.finish(queue_id, Result(
            outcomes=[Outcome(rcpt.id, "failed", "550 5.1.1 no such user")],
            attempts=[Attempt(rcpt.id, T0, "failed")],
            reports=[clash],
        ))
    got = row(raw, rcpt.id)
    assert (got["state"], got["attempts"], got["lease_owner"]) == ("active", 0, OWNER)
    assert count(raw, "attempts", queue_id) == 0
    assert message(raw, queue_id)["done_at"] is None
    assert work.body(queue_id) == BODY


def test_finish_leaves_recipients_leased_by_another_owner_alone(store, work, other, raw):
    queue_id = enqueue(store)
    (rcpt,) = claim_one(work).recipients
    other.finish(queue_id, Result([Outcome(rcpt.id, "delivered")]))
    got = row(raw, rcpt.id)
    assert (got["state"], got["attempts"], got["lease_owner"]) == ("active", 0, OWNER)
    assert message(raw, queue_id)["done_at"] is None
    assert work.body(queue_id) == BODY


def test_finish_after_the_lease_moved_to_another_owner_changes_nothing(store, work, other, raw, clock):
    queue_id = enqueue(store)
    (stale,) = claim_one(work, lease=60).recipients
    clock.advance(61)
    assert work.recover_expired() == 1
    (fresh,) = claim_one(other).recipients
    assert fresh.id == stale.id
    work.finish(queue_id, Result([Outcome(stale.id, "deferred", "451 late", next_attempt=T0 + 999)]))
    got = row(raw, stale.id)
    assert (got["state"], got["lease_owner"], got["attempts"], got["last_error"]) == ("active", OTHER, 0, None)


def test_finish_with_a_lost_lease_queues_no_bounce(store, work, other, raw, clock):
    queue_id = enqueue(store)
    (stale,) = claim_one(work, lease=60).recipients
    clock.advance(61)
    work.recover_expired()
    claim_one(other)
    bounce = NewMessage(store.new_id(), "", (NewRecipient("alice@example.com"),), b"Subject: failure\r\n\r\nx\r\n")
    work.finish(queue_id, Result(
        outcomes=[Outcome(stale.id, "failed", "550 5.1.1 no such user")],
        reports=[bounce],
    ))
    assert row(raw, stale.id)["state"] == "active"
    assert message(raw, bounce.queue_id) is None


# -- expand ----------------------------------------------------------------------------------


def test_expand_replaces_an_alias_by_queued_targets_that_remember_it(store, work, raw, clock):
    queue_id = enqueue(store, NewRecipient("sales@example.org", notify=("FAILURE",)), "bob@example.org",
                       priority="low")
    alias, bob = claim_one(work).recipients
    clock.advance(2)
    work.expand(queue_id, alias, ["alice@example.org", "Carol@Example.NET"], priority=3)
    got = rows(raw, queue_id)
    assert [(r["address"], r["state"]) for r in got] == [
        ("sales@example.org", "delivered"), ("bob@example.org", "active"),
        ("alice@example.org", "queued"), ("Carol@Example.NET", "queued")]
    assert got[0]["last_error"] == "expanded to alice@example.org, Carol@Example.NET"
    assert (got[0]["lease_owner"], got[0]["lease_until"]) == (None, None)
    for new in got[2:]:
        assert (new["orcpt"], new["notify"], new["priority"], new["next_attempt"], new["updated"], new["attempts"]) == (
            "rfc822;sales@example.org", "FAILURE", 3, T0 + 2, T0 + 2, 0)
    assert [r["domain"] for r in got[2:]] == ["example.org", "example.net"]
    assert message(raw, queue_id)["recipients"] == 4
    (attempt,) = raw.execute("SELECT recipient_id, outcome, reply, at FROM attempts").fetchall()
    assert tuple(attempt) == (alias.id, "expanded", "expanded to alice@example.org, Carol@Example.NET", T0 + 2)
    # the new rows are due at once, and the message is not done
    (job,) = work.claim(10, 60)
    assert [r.address for r in job.recipients] == ["alice@example.org", "Carol@Example.NET"]
    assert [r.orcpt for r in job.recipients] == ["rfc822;sales@example.org"] * 2
    assert message(raw, queue_id)["done_at"] is None
    assert bob.id not in {r.id for r in job.recipients}


def test_expand_keeps_an_existing_orcpt(store, work, raw):
    queue_id = enqueue(store, NewRecipient("sales@example.org", orcpt="rfc822;Sales@Example.org"))
    (alias,) = claim_one(work).recipients
    work.expand(queue_id, alias, ["alice@example.org"], priority=2)
    assert rows(raw, queue_id)[1]["orcpt"] == "rfc822;Sales@Example.org"
    assert rows(raw, queue_id)[1]["notify"] is None


def test_expand_of_a_recipient_leased_by_another_owner_does_nothing(store, work, other, raw):
    queue_id = enqueue(store, "sales@example.org")
    (alias,) = claim_one(work).recipients
    other.expand(queue_id, alias, ["alice@example.org"], priority=2)
    assert [(r["address"], r["state"]) for r in rows(raw, queue_id)] == [("sales@example.org", "active")]
    assert message(raw, queue_id)["recipients"] == 1
    assert count(raw, "attempts", queue_id) == 0


# -- release and recovery --------------------------------------------------------------------


def test_release_returns_claimed_recipients_to_the_queue(store, work, other, raw, clock):
    queue_id = enqueue(store, "a@example.org", "b@example.org")
    job = claim_one(work)
    ids = [r.id for r in job.recipients]
    assert other.release(ids) == 0  # not its leases
    assert {r["state"] for r in rows(raw, queue_id)} == {"active"}
    clock.advance(1)
    assert work.release(ids) == 2
    for r in rows(raw, queue_id):
        assert (r["state"], r["lease_owner"], r["lease_until"], r["attempts"], r["updated"]) == (
            "queued", None, None, 0, T0 + 1)
    assert work.release(ids) == 0
    assert work.release([]) == 0
    assert [r.id for r in claim_one(work).recipients] == ids


def test_recover_expired_returns_only_leases_that_ran_out(store, work, other, raw, clock):
    first = enqueue(store)
    clock.advance(1)
    second = enqueue(store)
    assert [j.queue_id for j in work.claim(1, 100)] == [first]
    (job,) = other.claim(10, 1000)
    assert job.queue_id == second
    clock.advance(100)  # first's lease ends exactly now: not yet expired
    assert work.recover_expired() == 0
    clock.advance(0.5)
    assert work.recover_expired() == 1
    assert rows(raw, first)[0]["state"] == "queued"
    assert (rows(raw, second)[0]["state"], rows(raw, second)[0]["lease_owner"]) == ("active", OTHER)
    assert work.recover_expired() == 0


# -- purge -----------------------------------------------------------------------------------


def deliver_all(work, queue_id, at):
    (job,) = work.claim(100, 60)
    assert job.queue_id == queue_id
    work.finish(queue_id, Result(
        [Outcome(r.id, "delivered") for r in job.recipients],
        [Attempt(r.id, at, "delivered") for r in job.recipients],
    ))


def test_purge_deletes_finished_messages_older_than_retention_with_their_rows(store, work, raw, clock):
    old = enqueue(store, "a@example.org", "b@example.org")
    deliver_all(work, old, clock())  # done at T0
    clock.advance(500)
    recent = enqueue(store)
    deliver_all(work, recent, clock())  # done at T0 + 500
    pending = enqueue(store)
    clock.advance(500)  # now T0 + 1000
    assert work.purge(retention=600) == 1
    assert message(raw, old) is None
    for table in ("recipients", "attempts", "bodies"):
        assert count(raw, table, old) == 0
    assert message(raw, recent) is not None
    assert count(raw, "recipients", recent) == count(raw, "attempts", recent) == 1
    assert message(raw, pending) is not None
    assert work.body(pending) == BODY
    assert work.purge(retention=600) == 0
    assert work.purge(retention=500) == 1  # done_at exactly at the cut-off goes
    assert message(raw, recent) is None
    assert message(raw, pending) is not None


def test_purge_takes_the_oldest_first_up_to_the_limit(store, work, raw, clock):
    done = []
    for _ in range(3):
        done.append(enqueue(store))
        deliver_all(work, done[-1], clock())
        clock.advance(10)
    assert work.purge(retention=0, limit=2) == 2
    assert [message(raw, q) is None for q in done] == [True, True, False]


# -- next_due and changed ------------------------------------------------------------------------


def test_next_due_is_the_earliest_queued_or_deferred_time(store, work, clock):
    assert work.next_due() is None
    enqueue(store, hold=True)
    assert work.next_due() is None  # held: never due by itself
    clock.advance(10)
    later = enqueue(store)
    assert work.next_due() == T0 + 10
    (rcpt,) = claim_one(work).recipients
    assert work.next_due() is None  # active: not waiting
    work.finish(later, Result([Outcome(rcpt.id, "deferred", "451", next_attempt=T0 + 400)]))
    clock.advance(1)
    enqueue(store)
    assert work.next_due() == T0 + 11
    claim_one(work)
    assert work.next_due() == T0 + 400


def test_closed_work_queue_refuses_use(tmp_path, clock):
    wq = WorkQueue(str(tmp_path / "queue.db"), OWNER, clock=clock)
    with pytest.raises(QueueError, match="not open"):
        wq.claim(1, 60)
    wq.open()
    wq.close()
    with pytest.raises(QueueError, match="not open"):
        wq.next_due()
    wq.close()  # twice is harmless


# -- schema migration --------------------------------------------------------------------------


def build_v1(path):
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in schema.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO messages (queue_id, created, sender, size, priority, envid, ret, body_type, recipients)"
        " VALUES ('0ABCDEFGHJKMN', ?, 'alice@example.com', 3, 2, 'E1', 'FULL', '7BIT', 2)", (T0 - 100,))
    conn.execute("INSERT INTO bodies (queue_id, data) VALUES ('0ABCDEFGHJKMN', X'616263')")
    conn.executemany(
        "INSERT INTO recipients (id, queue_id, address, domain, orcpt, notify, state, priority, attempts,"
        " next_attempt, last_error) VALUES (?, '0ABCDEFGHJKMN', ?, ?, NULL, ?, ?, 2, ?, ?, ?)",
        [(1, "bob@example.org", "example.org", "FAILURE", "deferred", 2, T0 - 50, "451 later"),
         (2, "carol@example.net", "example.net", None, "delivered", 1, T0 - 90, None)])
    conn.execute("INSERT INTO attempts (recipient_id, queue_id, at, host, reply, tls, outcome)"
                 " VALUES (2, '0ABCDEFGHJKMN', ?, 'mx.example.net', '250 ok', 'TLSv1.2', 'delivered')", (T0 - 90,))
    conn.execute("UPDATE meta SET value = '0ABCDEFGHJKMN' WHERE key = 'last_queue_id'")
    conn.close()


def test_version_1_database_is_migrated_with_its_data(tmp_path, clock):
    path = str(tmp_path / "queue.db")
    build_v1(path)
    wq = open_work(path, clock)
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION
        msg = dict(conn.execute("SELECT * FROM messages").fetchone())
        assert (msg["queue_id"], msg["sender"], msg["envid"], msg["recipients"], msg["done_at"], msg["requiretls"]) == (
            "0ABCDEFGHJKMN", "alice@example.com", "E1", 2, None, 0)
        got = [dict(r) for r in conn.execute("SELECT * FROM recipients ORDER BY id")]
        assert [(r["address"], r["state"], r["attempts"], r["last_error"], r["warned"]) for r in got] == [
            ("bob@example.org", "deferred", 2, "451 later", 0), ("carol@example.net", "delivered", 1, None, 0)]
        attempt = dict(conn.execute("SELECT * FROM attempts").fetchone())
        assert (attempt["host"], attempt["reply"], attempt["ip"], attempt["port"], attempt["duration"]) == (
            "mx.example.net", "250 ok", None, None, None)
        conn.close()
        # the migrated database works: claim, finish with the new columns
        (job,) = wq.claim(10, 60)
        assert (job.queue_id, job.envid, [r.address for r in job.recipients], job.requiretls) == (
            "0ABCDEFGHJKMN", "E1", ["bob@example.org"], False)
        assert job.recipients[0].notify == ("FAILURE",)
        assert wq.body("0ABCDEFGHJKMN") == b"abc"
        wq.finish(job.queue_id, Result([Outcome(1, "delivered")], [Attempt(1, T0, "delivered", ip="192.0.2.1",
                                                                          port=25, duration=0.5)]))
        assert wq.body("0ABCDEFGHJKMN") is None
    finally:
        wq.close()
    # and a Store opens it too, keeping the ID high-water mark
    with Store(path, clock=clock) as s:
        assert stored.message(s.path, "0ABCDEFGHJKMN")["done_at"] == T0
        assert s.new_id() > "0ABCDEFGHJKMN"


def test_version_1_database_opened_by_the_store_first_is_migrated(tmp_path, clock):
    path = str(tmp_path / "queue.db")
    build_v1(path)
    with Store(path, clock=clock) as s:
        assert [r["warned"] for r in stored.recipients(s.path, "0ABCDEFGHJKMN")] == [0, 0]
        wq = open_work(path, clock)
        try:
            assert wq.next_due() == T0 - 50
        finally:
            wq.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION
    conn.close()


def test_claim_costs_a_few_index_probes_however_big_the_queue(raw):
    """The claim runs after every commit of new mail and must cost the same with a million
    waiting recipients as with none: no scan of the state index (the state guard once made
    it walk every deferred recipient) and no sort of every due recipient by priority."""
    now = time.time()

    def plan(sql, args):
        return [r[3] for r in raw.execute("EXPLAIN QUERY PLAN " + sql, args)]

    candidates = plan(CANDIDATES, (now, 10))
    expected = "INDEX recipients_state_priority_next (state=? AND priority=? AND next_attempt<?)"
    searches = [step for step in candidates if step.startswith(("SEARCH recipients", "SCAN recipients"))]
    assert len(searches) == 8 and all(step.endswith(expected) for step in searches), candidates
    assert not any("TEMP B-TREE" in step for step in candidates), candidates  # no sort
    claim = CLAIM.format(ids="?,?")
    assert "INTEGER PRIMARY KEY" in plan(claim, (now, "o", now, 1, 2, "deferred"))[0]
    earliest = [step for step in plan(EARLIEST, ()) if step.startswith(("SEARCH recipients", "SCAN"))]
    assert len(earliest) == 8, earliest  # one probe per state and priority, no scan
    assert all("COVERING INDEX recipients_state_priority_next" in step for step in earliest), earliest


def test_claim_takes_the_most_urgent_first_across_states(store, work, raw, clock):
    low = enqueue(store, "low@x.example", priority="low")
    normal = enqueue(store, "normal@x.example")
    critical = enqueue(store, "critical@x.example", priority="critical")
    raw.execute("UPDATE recipients SET state = 'deferred' WHERE queue_id = ?", (normal,))
    clock.advance(1)
    jobs = work.claim(limit=2, lease=60)
    assert [j.queue_id for j in jobs] == [critical, normal]
    assert [j.queue_id for j in work.claim(limit=5, lease=60)] == [low]


def test_release_requeue_and_flush_are_no_failed_attempts(store, work, db_path, clock):
    """Issue 16, defect 10: an admin's "try now" that fails again neither adds to the attempts
    nor moves the backoff on; the next scheduled failure is the 2nd, with the 2nd wait."""
    from elemta.delivery.attempt import Verdict
    from elemta.delivery.outcomes import Reporting, decide
    from elemta.queue.admin import QueueAdmin
    from elemta.queue.schedule import RetrySchedule

    schedule = RetrySchedule(first=300.0, maximum=3600.0, jitter=0.0)
    reporting = Reporting(hostname="mx.example", new_id=store.new_id)
    qid = enqueue(store, "bob@example.org")

    def try_and_defer():
        [job] = work.claim(limit=10, lease=60)
        verdicts = [Verdict(r, "transient", "451 4.3.0 try later", "4.3.0") for r in job.recipients]
        attempts = [Attempt(r.id, clock(), "deferred", "451 4.3.0 try later") for r in job.recipients]
        work.finish(qid, decide(job, verdicts, attempts, schedule=schedule, reporting=reporting, now=clock()))

    def recipient():
        conn = sqlite3.connect(db_path)
        try:
            return conn.execute("SELECT state, attempts, next_attempt FROM recipients WHERE queue_id = ?",
                                (qid,)).fetchone()
        finally:
            conn.close()

    clock.advance(1)
    try_and_defer()
    assert recipient() == ("deferred", 1, clock() + 300.0)
    with QueueAdmin(db_path, clock=clock) as admin:
        for command in (lambda: admin.requeue([qid]), admin.flush,
                        lambda: (admin.hold([qid]), admin.release([qid]))):
            clock.advance(0.2)
            command()
            try_and_defer()  # the try now, refused again
            assert recipient() == ("deferred", 1, clock() + 300.0)
    clock.advance(300.0)
    try_and_defer()  # the scheduled retry: the 2nd failed attempt, then the 2nd wait
    assert recipient() == ("deferred", 2, clock() + 600.0)
    conn = sqlite3.connect(db_path)
    try:  # every try is in the history, the admin's too, marked
        replies = [row[0] for row in conn.execute("SELECT reply FROM attempts WHERE queue_id = ? ORDER BY id",
                                                   (qid,))]
        plain, marked = "451 4.3.0 try later", "451 4.3.0 try later (try now by elemtactl, not counted)"
        assert replies == [plain, marked, marked, marked, plain]
    finally:
        conn.close()


def test_a_scheduled_retry_given_back_still_counts(store, work, raw, clock):
    qid = enqueue(store, "bob@example.org")
    raw.execute("UPDATE recipients SET state = 'deferred', attempts = 1 WHERE queue_id = ?", (qid,))
    clock.advance(1)
    [job] = work.claim(limit=10, lease=60)
    assert job.recipients[0].counted
    assert work.release(job.recipients) == 1  # no free slot, or shutdown
    assert raw.execute("SELECT state FROM recipients WHERE queue_id = ?", (qid,)).fetchone()[0] == "deferred"
    [job] = work.claim(limit=10, lease=60)
    assert job.recipients[0].counted


def test_expand_all_gives_the_other_recipients_back_so_one_claim_takes_them_together(store, work, raw, clock):
    """Issue 16, defect 9: the targets of a message's aliases and its other final recipients
    are due together (one transaction), so a mailbox they share is seen twice in one claim."""
    queue_id = enqueue(store, "postmaster@example.org", "abuse@example.org", "alice@example.org")
    pm, abuse, alice = claim_one(work).recipients
    clock.advance(1)
    work.expand_all(queue_id, [(pm, ["alice@example.org"]), (abuse, ["alice@example.org"])], 2, [alice])
    assert [(r["address"], r["state"]) for r in rows(raw, queue_id)] == [
        ("postmaster@example.org", "delivered"), ("abuse@example.org", "delivered"),
        ("alice@example.org", "queued"), ("alice@example.org", "queued"), ("alice@example.org", "queued")]
    (job,) = work.claim(10, 60)
    assert [r.address for r in job.recipients] == ["alice@example.org"] * 3
    assert work.delivered_mailboxes(queue_id) == []  # expanded aliases are no mailboxes
    work.finish(queue_id, Result(outcomes=[Outcome(job.recipients[0].id, "delivered", "250 ok")]))
    assert work.delivered_mailboxes(queue_id) == [(alice.id, "alice@example.org")]

