"""The scheduler when the outcome of a delivery cannot be written (issue 16, defect 4).

A real scheduler (assemble.build_scheduler) delivers to a loopback MX (tests/mx.py) that records
every message. The disk fills while the MX holds the message's DATA: for real (a small tmpfs,
as root) or by fault injection (WorkQueue._apply raises SQLITE_FULL). The remote has the
message at that point, so its result must be kept and written once there is room, the message
sent exactly once, and the recipient not left `active` with its hour-long lease. A delivery that
never reached the remote (an error of elemta's own) must not wait an hour either.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest

from elemta import config as cfgmod
from elemta import log as logmod
from elemta.assemble import build_scheduler
from elemta.local import LocalRecipients
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.results import ERROR_RETRY
from elemta.queue.store import Store
from elemta.queue.work import WorkQueue
from tests.mx import Handler, Mx
from tests.support import wait_for

CONFIG = """
[server]
spool_dir = "{spool}"

[queue]
min_free_space = 0

[delivery]
relayhost = "127.0.0.1:{port}"
relayhost_tls_policy = "none"
"""


class GatedHandler(Handler):
    """A remote that, once the message's text is in, waits for `gate` before its 250."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.data_started += 1
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        with self.lock:
            self.data_started -= 1  # counted again by the recording handler
        return await super().handle_DATA(server, session, envelope)


class Lines:
    """An EventLog sink that keeps the lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(text)

    def having(self, *words: str) -> list[str]:
        return [line for line in list(self.lines) if all(w in line for w in words)]


class Setup:
    def __init__(self, spool: Path, mx: Mx, delivery_extra: str = "") -> None:
        text = CONFIG.format(spool=spool, port=mx.port) + delivery_extra  # [delivery] is last
        self.config = cfgmod.parse(tomllib.loads(text))
        self.store = Store(self.config.queue_path)
        self.store.open()
        self.lines = Lines()
        self.events = logmod.EventLog("debug", sink=self.lines)
        self.scheduler = build_scheduler(self.config, self.store, self.events,
                                         LocalRecipients.from_config(self.config))
        self.raw = sqlite3.connect(self.config.queue_path, isolation_level=None)
        self.raw.row_factory = sqlite3.Row

    def send(self) -> str:
        return self.store.enqueue(NewMessage(self.store.new_id(), "a@example.org",
                                             (NewRecipient("b@elsewhere.example"),),
                                             b"Subject: once\r\n\r\nexactly once\r\n"))

    def recipient(self, qid: str) -> sqlite3.Row:
        return self.raw.execute("SELECT * FROM recipients WHERE queue_id = ?", (qid,)).fetchone()

    def close(self) -> None:
        self.scheduler.stop(5)
        self.scheduler.work.close()
        self.store.close()
        self.raw.close()


@pytest.fixture
def setup_in(request):
    made: list[Setup] = []

    def make(spool: Path, mx: Mx) -> Setup:
        made.append(Setup(spool, mx))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only), unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(disk)],
                   check=True, timeout=30)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False, timeout=30)


def fill(disk: Path) -> Path:
    """Write a file until the file system has not one block left."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 12):
            while True:
                try:
                    handle.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


class InjectedFullDisk:
    """WorkQueue._apply (the writing of results) fails as on a full disk while `on`."""

    def __init__(self, monkeypatch) -> None:
        self.on = False
        real = WorkQueue._apply

        def apply(work, conn, queue_id, result, now):
            if self.on:
                raise sqlite3.OperationalError("database or disk is full")
            return real(work, conn, queue_id, result, now)

        monkeypatch.setattr(WorkQueue, "_apply", apply)


@pytest.mark.parametrize("how", [
    pytest.param("tmpfs", marks=pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root)")),
    "injected",
])
def test_a_delivered_result_the_full_disk_refused_is_written_later_and_sent_once(
        how, request, tmp_path, setup_in, monkeypatch):
    handler = GatedHandler()
    with Mx(handler) as mx:
        disk = request.getfixturevalue("small_disk") if how == "tmpfs" else tmp_path
        s = setup_in(disk / "spool", mx)
        injected = InjectedFullDisk(monkeypatch) if how == "injected" else None
        qid = s.send()
        s.scheduler.start()
        wait_for(lambda: handler.data_started == 1, 10, what="the MX holding the message's DATA")
        row = s.recipient(qid)
        assert (row["state"], row["lease_until"] > time.time() + 600) == ("active", True)
        if injected is not None:
            injected.on = True
        else:
            # The WAL emptied, so the next write must allocate blocks, then not one is left.
            s.raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            assert os.path.getsize(s.config.queue_path + "-wal") == 0
            filler = fill(disk)
        handler.gate.set()  # the remote takes the message: 250
        wait_for(lambda: s.lines.having(qid, "results_error", "full"), 10,
                 what=f"the result refused; log: {s.lines.lines[-5:]}")
        wait_for(lambda: s.lines.having(qid, "results_pending"), 10, what="a failed retry, said with the queue id")
        assert s.scheduler.work.unwritten() == 1
        assert s.recipient(qid)["state"] == "active"  # kept leased: not handed out again
        s.scheduler.wake()  # a claim finds nothing to take
        if injected is not None:
            injected.on = False
        else:
            filler.unlink()
        wait_for(lambda: s.recipient(qid)["state"] == "delivered", 40,
                 what=f"the kept result written once there is room; log: {s.lines.lines[-5:]}")
        row = s.recipient(qid)
        assert (row["lease_until"], row["lease_owner"]) == (None, None)
        assert s.lines.having(qid, "results_written")
        assert s.scheduler.work.unwritten() == 0
        received = handler.received()
    assert len(received) == 1 and b"exactly once" in received[0].data


def test_a_delivery_that_fails_inside_elemta_is_due_again_soon_not_after_the_lease(tmp_path, setup_in,
                                                                                   monkeypatch):
    """Release quickly on failure: an error of elemta's own before anything was sent (here the
    router raises) gives the recipient back due in ERROR_RETRY seconds, not an hour."""
    with Mx() as mx:
        s = setup_in(tmp_path / "spool", mx)
        broken = {"on": True}
        route = s.scheduler.router.route

        def fails_once(*args, **kwargs):
            if broken["on"]:
                broken["on"] = False
                raise RuntimeError("a bug in routing")
            return route(*args, **kwargs)

        monkeypatch.setattr(s.scheduler.router, "route", fails_once)
        qid = s.send()
        claimed = time.time()
        s.scheduler.start()
        wait_for(lambda: s.recipient(qid)["state"] == "deferred", 10,
                 what=f"the recipient given back; log: {s.lines.lines[-5:]}")
        row = s.recipient(qid)
        assert (row["lease_owner"], row["lease_until"], row["attempts"]) == (None, None, 0)
        assert not broken["on"]
        assert claimed < row["next_attempt"] <= time.time() + ERROR_RETRY
        assert s.lines.having("delivery_error")
        assert mx.handler.received() == []


def test_a_delivery_whose_attempt_raises_is_due_again_soon(tmp_path, setup_in, monkeypatch):
    with Mx() as mx:
        s = setup_in(tmp_path / "spool", mx)

        def steps(*args, **kwargs):
            raise RuntimeError("a bug in the attempt")

        monkeypatch.setattr(s.scheduler.attempter, "steps", steps)
        qid = s.send()
        s.scheduler.start()
        wait_for(lambda: s.recipient(qid)["state"] == "deferred", 10,
                 what=f"the recipient given back; log: {s.lines.lines[-5:]}")
        row = s.recipient(qid)
        assert (row["lease_owner"], row["lease_until"], row["attempts"]) == (None, None, 0)
        assert row["next_attempt"] <= time.time() + ERROR_RETRY
