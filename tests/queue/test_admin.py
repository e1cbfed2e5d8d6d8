"""elemta.queue.admin: what elemtactl reads from and changes in a real queue database."""

import contextlib
import os
import re
import sqlite3
import threading

import pytest

from elemta.queue import admin as admin_mod
from elemta.queue import db, query, schema
from elemta.queue.admin import (
    ALL,
    Change,
    Filters,
    NoSuchMessage,
    QueueAdmin,
    QueueBusy,
    QueueUnavailable,
)
from elemta.queue.jobs import Outcome, Result
from elemta.queue.store import Store
from tests.queue import sample
from tests.queue.sample import HOUR, T0, enqueue

NOWHERE = "0000000000000"  # a well-formed ID no message has


@pytest.fixture
def q(tmp_path):
    built = sample.build(str(tmp_path / "spool" / "queue.db"))
    yield built
    built.close()


@pytest.fixture
def admin(q):
    a = QueueAdmin(q.path, clock=q.clock)
    yield a
    a.close()


@contextlib.contextmanager
def raw(q):
    conn = sqlite3.connect(q.path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def states(q, queue_id):
    with raw(q) as conn:
        return {r["address"]: r["state"] for r in conn.execute(
            "SELECT address, state FROM recipients WHERE queue_id = ? ORDER BY id", (queue_id,))}


def recipient(q, address):
    with raw(q) as conn:
        return dict(conn.execute("SELECT * FROM recipients WHERE address = ?", (address,)).fetchone())


def listed(admin, **filters):
    return [m.queue_id for m in admin.list(Filters(**filters), limit=0).messages]


# -- opening ----------------------------------------------------------------------------------


def test_a_missing_database_is_unavailable_and_not_created(tmp_path):
    path = tmp_path / "queue.db"
    with QueueAdmin(str(path)) as a, pytest.raises(QueueUnavailable, match="no queue database"):
        a.list()
    with QueueAdmin(str(path)) as a, pytest.raises(QueueUnavailable, match="no queue database"):
        a.hold(ALL)
    assert not path.exists()


def test_a_missing_spool_directory_is_named(tmp_path):
    with QueueAdmin(str(tmp_path / "nope" / "queue.db")) as a, pytest.raises(
            QueueUnavailable, match=r"spool directory .*nope does not exist"):
        a.stats()


def test_a_database_that_is_not_a_queue_or_too_new_is_refused(tmp_path):
    path = str(tmp_path / "other.db")
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    with QueueAdmin(path) as a, pytest.raises(QueueUnavailable, match="not an elemta queue"):
        a.list()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    conn.close()
    with QueueAdmin(path) as a, pytest.raises(QueueUnavailable, match="newer than this elemtactl"):
        a.list()


def test_reads_are_read_only_and_work_while_another_connection_writes(q, admin):
    with raw(q) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE recipients SET state = 'held' WHERE address = 'ivan@example.org'")
        assert len(admin.list().messages) == 4  # WAL: the reader sees the last commit, no wait
        other.execute("ROLLBACK")
    assert admin._reader.execute("PRAGMA query_only").fetchone()[0] == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        admin._reader.execute("DELETE FROM messages")


def test_a_change_waits_for_the_lock_then_reports_busy(q, monkeypatch):
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 50)  # SQLite's own busy handler does the waiting
    with raw(q) as other, QueueAdmin(q.path, clock=q.clock) as a:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(QueueBusy, match="locked"):
            a.hold([q.queued])
        other.execute("ROLLBACK")
        assert a.hold([q.queued]).recipients == 2


# -- list -------------------------------------------------------------------------------------


def test_list_shows_messages_still_to_deliver_oldest_first(q, admin):
    page = admin.list()
    assert [m.queue_id for m in page.messages] == q.pending
    assert page.next_after is None
    first = page.messages[0]
    assert first == query.MessageSummary(
        q.deferred, T0 + HOUR, 4 * 3600, len(sample.BODY), "alice@example.com", "normal",
        (query.RecipientState("bob@example.org", "deferred"), query.RecipientState("carol@example.net", "delivered")),
        T0 + HOUR + 600 + 10 * HOUR, "451 4.7.1 greylisted")
    held = page.messages[-1]
    assert (held.sender, held.priority, held.next_attempt, held.age) == ("", "low", None, 3600)


@pytest.mark.parametrize(("filters", "expected"), [
    ({"state": "deferred"}, ["deferred"]),
    ({"state": "active"}, ["active"]),
    ({"state": "held"}, ["held"]),
    ({"state": "queued"}, ["queued"]),
    ({"state": "delivered"}, ["done", "deferred"]),  # final messages too, kept for retention
    ({"state": "failed"}, []),
    ({"domain": "example.net"}, ["queued"]),  # carol@example.net is delivered: not pending
    ({"domain": "EXAMPLE.ORG."}, ["deferred", "active", "queued", "held"]),
    ({"domain": "example.net", "state": "delivered"}, ["deferred"]),
    ({"domain": "example.com"}, []),  # hank's message is done
    ({"sender": "Alice@Example.COM"}, ["deferred", "active"]),
    ({"sender": "@example.com"}, ["deferred", "active", "queued"]),
    ({"sender": "<>"}, ["held"]),
    ({"sender": ""}, ["held"]),
    ({"recipient": "frank@example.net"}, ["queued"]),
    ({"recipient": "bob@example.org", "state": "deferred"}, ["deferred"]),
    ({"recipient": "bob@example.org", "domain": "example.net"}, []),
    ({"recipient": "carol@example.net"}, []),
    ({"older_than": 2 * HOUR}, ["deferred", "active", "queued"]),
    ({"older_than": 3 * HOUR + 1}, ["deferred"]),
    ({"older_than": 10 * HOUR}, []),
    ({"priority": "high"}, ["queued"]),
    ({"priority": "low", "sender": "<>", "state": "held"}, ["held"]),
    ({"priority": "critical"}, []),
    ({"priority": "normal", "older_than": 3.5 * HOUR}, ["deferred"]),
])
def test_list_filters(q, admin, filters, expected):
    assert listed(admin, **filters) == [getattr(q, name) for name in expected]


def test_list_pages_with_a_cursor_not_an_offset(q, admin):
    first = admin.list(limit=3)
    assert [m.queue_id for m in first.messages] == q.pending[:3]
    assert first.next_after == q.pending[2]
    second = admin.list(limit=3, after=first.next_after)
    assert ([m.queue_id for m in second.messages], second.next_after) == ([q.held], None)
    # Exactly a page left: no cursor, so no empty page after it.
    assert admin.list(limit=2, after=q.active).next_after is None
    # A message deleted between two pages does not shift the next page.
    admin.delete([q.deferred])
    assert [m.queue_id for m in admin.list(limit=3, after=first.next_after).messages] == [q.held]


def test_list_of_an_empty_queue(tmp_path):
    path = str(tmp_path / "queue.db")
    with Store(path):
        pass
    with QueueAdmin(path) as a:
        assert a.list() == query.Page((), None)
        assert a.stats().messages == 0


def test_filters_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown state"):
        Filters(state="stuck")
    with pytest.raises(ValueError, match="unknown priority"):
        Filters(priority="urgent")


# -- show, body, trace --------------------------------------------------------------------------


def test_show_gives_envelope_headers_and_recipients(q, admin):
    d = admin.show(q.queued)
    assert (d.sender, d.priority, d.envid, d.ret, d.body_type, d.smtputf8) == (
        "eve@example.com", "high", "ENV-1", "HDRS", "8BITMIME", False)
    assert (d.client_ip, d.client_helo, d.listener, d.created, d.age, d.done_at) == (
        "2001:db8::7", "[2001:db8::7]", "[::]:587", T0 + 3 * HOUR, 2 * 3600, None)
    assert d.body_available
    assert d.headers == (
        ("Received", ("from client.example (client.example [192.0.2.7]) by mx.example (elemta) with ESMTP id X;"
                      " Tue, 14 Nov 2023 22:13:20 +0000")),
        ("From", "Alice <alice@example.com>"),
        ("Subject", "quarterly report"),
    )
    frank, ivan = d.recipients
    assert frank == query.RecipientDetail("Frank@Example.NET", "queued", 0, T0 + 3 * HOUR, None,
                                          "rfc822;frank@example.net", ("SUCCESS", "FAILURE"), T0 + 3 * HOUR, None)
    assert (ivan.address, ivan.notify, ivan.orcpt) == ("ivan@example.org", (), None)


def test_show_of_a_final_message_says_the_body_is_gone(q, admin):
    d = admin.show(q.done)
    assert (d.body_available, d.headers, d.done_at) == (False, (), T0 + 10)
    assert admin.body(q.done) is None
    assert admin.body(q.queued) == sample.BODY


def test_unknown_ids_raise_no_such_message(admin):
    for call in (admin.show, admin.body, admin.trace):
        with pytest.raises(NoSuchMessage, match=NOWHERE):
            call(NOWHERE)


def test_headers_of_a_large_body_are_read_in_growing_prefixes(q, admin):
    big = b"X-Big: " + b"a" * 200_000 + b"\r\nSubject: end\r\n\r\n" + b"b" * 1_000_000
    qid = enqueue(q.store, "x@example.org", body=big, hold=True)
    assert admin.show(qid).headers[-1] == ("Subject", "end")
    no_blank_line = enqueue(q.store, "x@example.org", body=b"Subject: only\r\n", hold=True)
    assert admin.show(no_blank_line).headers == (("Subject", "only"),)


def test_parse_headers_unfolds_and_tolerates_bad_bytes():
    assert query.parse_headers(b"A: 1\r\n 2\r\n\t3\r\nB:\xff\r\nnot a field\r\nC:x") == (
        ("A", "1 2 3"), ("B", "\ufffd"), ("C", "x"))


def test_trace_lists_every_attempt_and_the_next_retry(q, admin):
    t = admin.trace(q.deferred)
    assert (t.queue_id, t.sender, t.created) == (q.deferred, "alice@example.com", T0 + HOUR)
    bob, carol = t.recipients
    assert (bob.state, bob.attempts, bob.next_attempt, bob.last_error) == (
        "deferred", 2, T0 + HOUR + 600 + 10 * HOUR, "451 4.7.1 greylisted")
    assert [(a.at, a.outcome, a.host, a.ip, a.port, a.tls, a.duration) for a in bob.tries] == [
        (T0 + HOUR, "deferred", "mx.example.org", "192.0.2.26", 25, "TLSv1.3", 1.25),
        (T0 + HOUR + 600, "deferred", "mx.example.org", "192.0.2.26", 25, "TLSv1.3", 1.25),
    ]
    assert (carol.state, carol.next_attempt) == ("delivered", None)
    assert [(a.outcome, a.reply, a.ip, a.tls) for a in carol.tries] == [("delivered", "250 ok", "2001:db8::25", None)]
    (gina,) = admin.trace(q.active).recipients
    assert (gina.state, gina.next_attempt, gina.tries) == ("active", None, ())


# -- stats --------------------------------------------------------------------------------------


def test_stats_counts_states_priorities_and_ages_by_domain(q, admin):
    s = admin.stats()
    assert (s.messages, s.bytes, s.oldest_age) == (4, 3 * len(sample.BODY) + 17, 4 * 3600)
    assert s.recipients_by_state == {"queued": 2, "active": 1, "deferred": 1, "held": 1, "delivered": 2,
                                     "failed": 0}
    assert s.messages_by_priority == {"critical": 0, "high": 1, "normal": 2, "low": 1}
    assert s.bucket_minutes == (5, 10, 20, 40, 80, 160, 320, 640, 1280)
    # held 60 min old (40-80), queued 120 (80-160), active and deferred 180 and 240 (160-320)
    assert s.domains == (
        query.DomainShape("example.org", 4, (0, 0, 0, 0, 1, 1, 2, 0, 0, 0)),
        query.DomainShape("example.net", 1, (0, 0, 0, 0, 0, 1, 0, 0, 0, 0)),
    )
    assert (s.totals, s.domain_count) == ((0, 0, 0, 0, 1, 2, 2, 0, 0, 0), 2)


def test_stats_buckets_edges(tmp_path):
    clock = sample.Clock()
    with Store(str(tmp_path / "q.db"), clock=clock) as store:
        for minutes in (2000, 1280, 1279, 10, 5, 4, 0):
            clock.now = T0 - minutes * 60
            enqueue(store, "a@example.org", hold=True)
        with QueueAdmin(store.path, clock=lambda: T0) as a:
            (shape,) = a.stats().domains
    # 0 and 4 minutes: under 5; 5: 5-10; 10: 10-20; 1279: 640-1280; 1280 and 2000: older
    assert shape.buckets == (2, 1, 1, 0, 0, 0, 0, 0, 1, 2)


# -- changes ------------------------------------------------------------------------------------


def test_hold_leaves_recipients_being_delivered_alone_and_reports_them(q, admin):
    change = admin.hold([q.deferred, q.active, q.queued, NOWHERE])
    assert change == Change("hold", 2, 3, skipped=(q.active,), not_found=(NOWHERE,))
    assert states(q, q.deferred) == {"bob@example.org": "held", "carol@example.net": "delivered"}
    assert states(q, q.queued) == {"Frank@Example.NET": "held", "ivan@example.org": "held"}
    assert states(q, q.active) == {"gina@example.org": "active"}
    # The delivery in flight finishes normally: its lease was not touched.
    gina = recipient(q, "gina@example.org")
    q.work.finish(q.active, Result([Outcome(gina["id"], "delivered")]))
    assert states(q, q.active) == {"gina@example.org": "delivered"}
    q.clock.advance(20 * HOUR)
    assert q.work.claim(10, 60) == []  # held mail is never claimed


def test_release_makes_held_mail_due_now_for_the_scheduler(q, admin):
    assert q.work.claim(10, 60)[0].queue_id == q.queued  # what is due now: the queued message only
    assert admin.release([q.held]) == Change("release", 1, 1)
    dave = recipient(q, "dave@example.org")
    assert (dave["state"], dave["next_attempt"], dave["updated"]) == ("queued", q.clock(), q.clock())
    assert [j.queue_id for j in q.work.claim(10, 60)] == [q.held]
    assert admin.release([q.held]) == Change("release", 0, 0)  # nothing held any more


def test_requeue_makes_deferred_recipients_due_now_and_keeps_their_attempts(q, admin):
    assert admin.requeue([q.deferred, q.queued]) == Change("requeue", 1, 1)
    bob = recipient(q, "bob@example.org")
    assert (bob["state"], bob["next_attempt"], bob["attempts"], bob["last_error"]) == (
        "queued", q.clock(), 2, "451 4.7.1 greylisted")
    jobs = {j.queue_id: j for j in q.work.claim(10, 60)}
    assert jobs[q.deferred].recipients[0].attempts == 2


def test_flush_makes_everything_or_one_domain_due(q, admin):
    with raw(q) as conn:  # a second deferred recipient, at example.net, due in an hour
        conn.execute("UPDATE recipients SET state = 'deferred', next_attempt = ? WHERE address = 'ivan@example.org'",
                     (q.clock() + HOUR,))
        conn.execute("UPDATE recipients SET domain = 'example.net' WHERE address = 'ivan@example.org'")
    assert admin.flush("Example.NET") == Change("flush", 1, 1)
    assert recipient(q, "ivan@example.org")["next_attempt"] == q.clock()
    assert recipient(q, "bob@example.org")["state"] == "deferred"
    assert admin.flush() == Change("flush", 1, 1)  # bob; the rest is due already
    assert admin.flush() == Change("flush", 0, 0)
    assert {r.address for j in q.work.claim(10, 60) for r in j.recipients} == {
        "bob@example.org", "ivan@example.org", "Frank@Example.NET"}


def test_delete_removes_everything_of_a_message_without_a_bounce(q, admin):
    assert admin.delete([q.deferred, q.done, NOWHERE]) == Change("delete", 2, 3, not_found=(NOWHERE,))
    with raw(q) as conn:
        for table in ("messages", "bodies", "recipients", "attempts"):
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE queue_id IN (?, ?)",
                                (q.deferred, q.done)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3  # no bounce queued


def test_delete_skips_a_message_being_delivered(q, admin):
    assert admin.delete([q.active]) == Change("delete", 0, 0, skipped=(q.active,))
    gina = recipient(q, "gina@example.org")
    q.work.finish(q.active, Result([Outcome(gina["id"], "deferred", "451 later", next_attempt=q.clock() + 60)]))
    assert admin.delete([q.active]) == Change("delete", 1, 1)


def test_all_changes_every_message_in_short_transactions(q, admin, monkeypatch):
    monkeypatch.setattr(admin_mod, "_CHUNK", 2)  # several rounds with this small queue
    for n in range(3):
        enqueue(q.store, f"r{n}@example.com", f"s{n}@example.com")
    assert admin.hold(ALL) == Change("hold", 5, 9, skipped=(q.active,))
    assert admin.release(ALL) == Change("release", 6, 10)
    assert admin.hold(ALL) == Change("hold", 6, 10, skipped=(q.active,))  # dave was released too
    assert admin.delete(ALL) == Change("delete", 6, 11, skipped=(q.active,))
    assert [m.queue_id for m in admin.list().messages] == [q.active]
    assert admin.show(q.done).done_at is not None  # final messages stay for their retention


def test_all_must_be_the_constant_not_a_lone_id(admin):
    with pytest.raises(TypeError, match="sequence of queue IDs or ALL"):
        admin.hold("1GA4KQB3S0000")


def test_priority_changes_the_message_and_its_recipients_still_to_deliver(q, admin):
    assert admin.set_priority(q.deferred, "critical") == Change("priority", 1, 1)
    with raw(q) as conn:
        assert conn.execute("SELECT priority FROM messages WHERE queue_id = ?", (q.deferred,)).fetchone()[0] == 0
        assert {r["address"]: r["priority"] for r in conn.execute(
            "SELECT address, priority FROM recipients WHERE queue_id = ?", (q.deferred,))} == {
            "bob@example.org": 0, "carol@example.net": 2}  # carol is delivered
    assert admin.set_priority(q.deferred, "critical") == Change("priority", 0, 0)
    with pytest.raises(NoSuchMessage):
        admin.set_priority(NOWHERE, "low")
    with pytest.raises(ValueError, match="unknown priority"):
        admin.set_priority(q.deferred, "urgent")
    assert listed(admin, priority="critical") == [q.deferred]


def test_admin_reads_write_nothing_and_a_release_commits(q, admin):
    """Seen from another connection, as the scheduler's claim sees the queue: PRAGMA
    data_version moves with every commit of another connection, and only then."""
    with raw(q) as conn:
        def version():
            return conn.execute("PRAGMA data_version").fetchone()[0]

        before = version()
        admin.list()
        assert version() == before  # reads change nothing
        admin.release([q.held])
        assert version() != before


def test_a_claim_racing_a_hold_never_gives_a_recipient_to_both(q, admin):
    """hold ALL against the scheduler claiming at the same time: each recipient ends up either
    held or claimed (active), never held while the scheduler delivers it."""
    for n in range(200):
        enqueue(q.store, f"r{n}@example.com")
    claimed: list[int] = []
    start = threading.Barrier(2)

    def scheduler():
        start.wait()
        for _ in range(20):
            claimed.extend(r.id for job in q.work.claim(10, 600) for r in job.recipients)

    thread = threading.Thread(target=scheduler)
    thread.start()
    start.wait()
    held = admin.hold(ALL)
    thread.join()
    with raw(q) as conn:
        got = dict(conn.execute("SELECT id, state FROM recipients WHERE address LIKE 'r%@example.com'"))
    mine = set(claimed) & set(got)
    assert {rid: got[rid] for rid in mine} == dict.fromkeys(mine, "active")
    assert {rid: state for rid, state in got.items() if rid not in mine} == dict.fromkeys(set(got) - mine, "held")
    assert held.recipients >= len(got) - len(mine)


# -- the queries use their indexes -------------------------------------------------------------


def plan(admin, sql_params):
    return " | ".join(row[3] for row in admin._reader.execute("EXPLAIN QUERY PLAN " + sql_params[0], sql_params[1]))


@pytest.mark.parametrize(("filters", "index"), [
    (Filters(), "recipients_state_queue"),
    (Filters(state="held"), "recipients_state_queue"),
    (Filters(domain="example.org"), "recipients_domain_state"),
    (Filters(recipient="bob@example.org", state="deferred"), "recipients_domain_state"),
    (Filters(older_than=60, priority="low", sender="@example.com"), "recipients_state_queue"),
])
def test_list_reads_index_ranges_and_never_sorts_the_queue(admin, filters, index):
    admin.list()
    text = plan(admin, query._page_query(filters, 50, "", T0))
    assert re.search(f"SEARCH r USING (COVERING )?INDEX {index}", text)
    assert "SCAN r " not in text and "SCAN recipients" not in text
    assert "TEMP B-TREE FOR GROUP BY" not in text  # only the final merge of a page is sorted


def test_stats_reads_one_covering_index_without_sorting(admin):
    admin.stats()
    text = plan(admin, (query.shape_sql(), [""] * len(query.BUCKET_MINUTES)))
    assert text == "SCAN recipients USING COVERING INDEX recipients_domain_state"


@pytest.mark.parametrize("guard", [
    *(guard for guard, _, _ in admin_mod._MOVES.values()), admin_mod.flush_guard(False), admin_mod.flush_guard(True),
])
def test_each_round_of_a_change_to_all_searches_an_index(admin, guard):
    """A round that scanned the table would make ALL on a big queue quadratic."""
    admin.list()
    text = plan(admin, (f"SELECT id FROM recipients WHERE {guard} LIMIT 10", {"now": T0, "domain": "example.org"}))
    assert "SCAN" not in text and "SEARCH recipients USING" in text
    if "next_attempt" in guard:
        # Queued recipients not yet due are few; a search bounded by state alone would walk
        # every queued recipient (all of a backlog of due mail) in each round.
        assert "next_attempt>?" in text, text


def test_reads_leave_the_database_file_as_it_was(q):
    before = os.stat(q.path).st_mtime_ns
    with QueueAdmin(q.path, clock=q.clock) as a:
        a.list()
        a.stats()
        a.show(q.queued)
        a.trace(q.deferred)
    assert os.stat(q.path).st_mtime_ns == before
