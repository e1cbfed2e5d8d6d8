"""elemta.queue.results: the results writer (group commits, kept results and their retries,
the hand-over at a reload), through WorkQueue.submit on a real SQLite file."""

import fcntl
import os
import sqlite3

from elemta.queue import db
from elemta.queue import results as resultsmod
from elemta.queue.jobs import Outcome, Result
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.work import WorkQueue
from tests.queue.conftest import T0, open_work
from tests.queue.test_work import enqueue, message, row
from tests.support import wait_for


def test_results_that_come_while_the_writer_waits_for_its_turn_join_its_batch(store, work, raw, db_path):
    # The writer thread takes one result, then waits for the writers' lock (another
    # process commits); results submitted meanwhile are written in the same transaction.
    queue_ids = [enqueue(store, "a@example.org") for _ in range(5)]
    jobs = {job.queue_id: job for job in work.claim(100, 600.0)}
    commits = []
    work._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    fd = os.open(db_path + db.LOCK_SUFFIX, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        first, *rest = queue_ids
        work.submit(first, Result([Outcome(jobs[first].recipients[0].id, "delivered")]))
        wait_for(lambda: work._results._pending.unfinished_tasks == 1 and work._results._pending.qsize() == 0,
                 what="the writer to take the first result")
        for queue_id in rest:
            work.submit(queue_id, Result([Outcome(jobs[queue_id].recipients[0].id, "delivered")]))
    finally:
        os.close(fd)
    work.flush()
    assert commits == ["COMMIT"]
    assert all(message(raw, q)["done_at"] is not None for q in queue_ids)


class Events:
    """An EventLog that remembers (event, qid, fields)."""

    def __init__(self):
        self.lines = []

    def __call__(self, event, qid=None, level=0, **fields):
        self.lines.append((event, qid, fields))

    def named(self, event):
        return [(qid, fields) for name, qid, fields in self.lines if name == event]


def test_submitted_results_are_committed_together_and_a_bad_one_alone_fails(store, db_path, clock, raw):
    events, committed = Events(), []
    wq = open_work(db_path, clock, log=events)
    try:
        good, bad = enqueue(store), enqueue(store)
        jobs = {j.queue_id: j for j in wq.claim(10, 60)}
        (good_rcpt,), (bad_rcpt,) = jobs[good].recipients, jobs[bad].recipients
        clash = NewMessage(bad, "", (NewRecipient("alice@example.com"),), b"x\r\n")  # same queue_id: rejected
        wq.submit(good, Result([Outcome(good_rcpt.id, "delivered", "250 ok")]), lambda: committed.append(good))
        wq.submit(bad, Result([Outcome(bad_rcpt.id, "failed", "550 no")], reports=[clash]),
                  lambda: committed.append(bad))
        wq.flush()
    finally:
        wq.close()
    assert committed == [good, bad]
    assert row(raw, good_rcpt.id)["state"] == "delivered"
    # The refused result (its bounce clashes) is not written, and its recipient is not left
    # leased for an hour either: it is due again in ERROR_RETRY seconds, that try not counted.
    got = row(raw, bad_rcpt.id)
    assert (got["state"], got["lease_owner"], got["next_attempt"], got["attempts"]) == (
        "deferred", None, T0 + resultsmod.ERROR_RETRY, 0)
    assert "result not recorded" in got["last_error"]
    assert [qid for qid, _ in events.named("results_error")] == [bad]


def test_a_refused_result_still_records_what_was_delivered(store, db_path, clock, raw):
    """Delivered wins: a result the database refuses for its own content is salvaged, its
    delivered recipients recorded (the remote has the message), the others given back."""
    wq = open_work(db_path, clock, log=Events())
    try:
        qid = enqueue(store, "a@example.org", "b@example.org")
        (job,) = wq.claim(10, 3600)
        first, second = job.recipients
        clash = NewMessage(qid, "", (NewRecipient("alice@example.com"),), b"x\r\n")  # same queue_id: rejected
        wq.submit(qid, Result([Outcome(first.id, "delivered", "250 ok"),
                               Outcome(second.id, "failed", "550 no")], reports=[clash]))
        wq.flush()
    finally:
        wq.close()
    assert row(raw, first.id)["state"] == "delivered"
    assert (row(raw, second.id)["state"], row(raw, second.id)["lease_owner"]) == ("deferred", None)


def disk_full_on_results(monkeypatch, error="database or disk is full"):
    """WorkQueue._apply (the writing of results) fails, as on a full disk, while full["on"]."""
    full = {"on": True}
    real_apply = WorkQueue._apply

    def apply(self, conn, queue_id, result, now):
        if full["on"]:
            raise sqlite3.OperationalError(error)
        return real_apply(self, conn, queue_id, result, now)

    monkeypatch.setattr(WorkQueue, "_apply", apply)
    monkeypatch.setattr(resultsmod, "RETRY_FIRST", 0.05)
    monkeypatch.setattr(resultsmod, "RETRY_MAX", 0.2)
    return full


def test_a_result_that_cannot_be_written_is_kept_retried_and_never_handed_out_again(
        store, db_path, clock, raw, monkeypatch):
    """issue 16, defect 4: a full disk while recording a delivery. The result is in memory: it
    is written once the disk has room, the recipient is not recovered meanwhile however long it
    takes (the remote already has the message), and its lease ends as soon as it is written."""
    full = disk_full_on_results(monkeypatch)
    events = Events()
    wq = open_work(db_path, clock, log=events)
    try:
        qid = enqueue(store)
        (job,) = wq.claim(10, 60)
        (rcpt,) = job.recipients
        wq.submit(qid, Result([Outcome(rcpt.id, "delivered", "250 2.0.0 taken")]))
        wait_for(lambda: wq.unwritten() == 1, 5, what="the result kept in memory")
        ((kept_qid, kept),) = events.named("results_error")
        assert kept_qid == qid and "disk is full" in kept["error"] and kept["waiting"] == 1
        clock.advance(7200)  # the lease (60 s) ran out long ago
        assert wq.recover_expired() == 0, "its recipient must not be delivered twice"
        assert wq.claim(10, 60) == []
        # Each failed retry says so, and renews the lease (that write still works here).
        wait_for(lambda: len(events.named("results_pending")) >= 2, 5, what="retries")
        assert events.named("results_pending")[0][0] == qid
        assert row(raw, rcpt.id)["lease_until"] == T0 + 7200 + 60
        full["on"] = False
        wait_for(lambda: wq.unwritten() == 0, 10, what="the result written once there is room")
    finally:
        wq.close()
    state = row(raw, rcpt.id)
    assert (state["state"], state["lease_owner"], state["lease_until"]) == ("delivered", None, None)
    ((written_qid, written),) = events.named("results_written")
    assert written_qid == qid and written["tries"] >= 3


def test_a_give_back_waits_behind_the_kept_result_of_its_recipient(store, db_path, clock, raw, monkeypatch):
    """Results are written in order per recipient: a later give-back (or deferral) of a
    recipient whose delivered result waits in memory is written after it, so delivered wins."""
    full = disk_full_on_results(monkeypatch)
    wq = open_work(db_path, clock, log=Events())
    try:
        qid = enqueue(store)
        (job,) = wq.claim(10, 60)
        (rcpt,) = job.recipients
        wq.submit(qid, Result([Outcome(rcpt.id, "delivered", "250 taken")]))
        wait_for(lambda: wq.unwritten() == 1, 5, what="the result kept")
        full["on"] = False  # the disk has room again, but the give-back comes before the retry
        wq.give_back(qid, [rcpt])
        wq.flush()
        assert wq.unwritten() in (0, 2)  # written in order, or both still waiting
        wait_for(lambda: wq.unwritten() == 0, 10, what="both written")
    finally:
        wq.close()
    assert row(raw, rcpt.id)["state"] == "delivered"


def test_a_give_back_that_cannot_be_written_is_retried_not_left_for_the_lease(
        store, db_path, clock, raw, monkeypatch):
    full = disk_full_on_results(monkeypatch)
    wq = open_work(db_path, clock, log=Events())
    try:
        qid = enqueue(store)
        (job,) = wq.claim(10, 3600)
        wq.give_back(qid, job.recipients)
        wait_for(lambda: wq.unwritten() == 1, 5, what="the give-back kept")
        full["on"] = False
        wait_for(lambda: wq.unwritten() == 0, 10, what="the give-back written")
    finally:
        wq.close()
    got = row(raw, job.recipients[0].id)
    assert (got["state"], got["lease_owner"], got["lease_until"]) == ("queued", None, None)


def test_too_many_kept_results_mean_no_more_claims_never_a_dropped_one(store, db_path, clock, raw, monkeypatch):
    full = disk_full_on_results(monkeypatch)
    monkeypatch.setattr(resultsmod, "MAX_UNWRITTEN", 3)
    wq = open_work(db_path, clock, log=Events())
    try:
        for _ in range(4):
            enqueue(store)
        jobs = wq.claim(10, 60)
        for job in jobs[:3]:
            wq.submit(job.queue_id, Result([Outcome(job.recipients[0].id, "delivered", "250 ok")]))
        wait_for(lambda: wq.unwritten() == 3, 5, what="three kept")
        assert wq.backlogged()
        full["on"] = False
        wait_for(lambda: wq.unwritten() == 0, 10, what="all written")
        assert not wq.backlogged()
    finally:
        wq.close()
    assert [row(raw, j.recipients[0].id)["state"] for j in jobs] == ["delivered"] * 3 + ["active"]


def test_a_result_still_unwritten_at_close_is_reported_as_lost(store, db_path, clock, raw, monkeypatch):
    disk_full_on_results(monkeypatch, "disk I/O error")
    monkeypatch.setattr(resultsmod, "CLOSE_RETRY", 0.3)
    events = Events()
    wq = open_work(db_path, clock, log=events)
    qid = enqueue(store)
    (job,) = wq.claim(10, 60)
    wq.submit(qid, Result([Outcome(job.recipients[0].id, "delivered", "250 ok")]))
    wq.close()
    lost = [fields for q, fields in events.named("results_error") if q == qid and "lost" in fields.get("kept", "")]
    assert lost and "delivered again at the next start" in lost[0]["kept"]
    assert row(raw, job.recipients[0].id)["state"] == "active"  # the next start recovers it


def test_event_levels_are_the_logs():
    from elemta import log as logmod

    assert (resultsmod.WARNING, resultsmod.ERROR) == (logmod.WARNING, logmod.ERROR)


def test_at_a_reload_the_kept_results_go_to_the_next_scheduler(store, db_path, clock, raw, monkeypatch):
    """A reload replaces the scheduler (same process, same lease owner): what the old one could
    not write is handed to the new one's writer, not dropped after CLOSE_RETRY."""
    full = disk_full_on_results(monkeypatch)
    monkeypatch.setattr(resultsmod, "CLOSE_RETRY", 0.0)
    old = open_work(db_path, clock, log=Events())
    new = open_work(db_path, clock, log=Events())
    try:
        qid = enqueue(store)
        (job,) = old.claim(10, 3600)
        old.submit(qid, Result([Outcome(job.recipients[0].id, "delivered", "250 ok")]))
        wait_for(lambda: old.unwritten() == 1, 5, what="the result kept")
        old.close(successor=new)
        wait_for(lambda: new.unwritten() == 1, 5, what="the result kept by the successor")
        assert new.recover_expired() == 0
        full["on"] = False
        wait_for(lambda: new.unwritten() == 0, 10, what="written by the successor")
    finally:
        new.close()
    assert row(raw, job.recipients[0].id)["state"] == "delivered"


def test_a_result_submitted_after_a_reload_closed_the_old_writer_goes_to_the_new_one(store, db_path, clock, raw):
    """A delivery abandoned at a reload (still running after the grace period) that ends
    later: its result is written by the new scheduler's writer, not lost for the lease's hour."""
    old, new = open_work(db_path, clock), open_work(db_path, clock)
    try:
        qid = enqueue(store)
        (job,) = old.claim(10, 3600)
        old.close(successor=new)
        old.submit(qid, Result([Outcome(job.recipients[0].id, "delivered", "250 ok")]))
        new.flush()
    finally:
        new.close()
    assert row(raw, job.recipients[0].id)["state"] == "delivered"
