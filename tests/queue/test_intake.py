"""IntakeLimits: the queue's quota and free-space answers, with a clock and counters of its own."""

from __future__ import annotations

import os

import pytest

from elemta.errors import QueueError
from elemta.queue.intake import CACHE_SECONDS, ROW_OVERHEAD, IntakeLimits


class Counters:
    def __init__(self):
        self.now = 1000.0
        self.committed = (0, 0)  # what this process committed
        self.undelivered = (0, 0)  # what a count of the database finds
        self.counts = 0

    def count(self):
        self.counts += 1
        return self.undelivered


def limits(tmp_path, counters, **kw):
    kw = {"min_free_bytes": 0, "max_messages": 0, "max_bytes": 0, **kw}
    return IntakeLimits(str(tmp_path / "queue.db"), clock=lambda: counters.now,
                        committed=lambda: counters.committed, count_undelivered=counters.count, **kw)


def test_no_limits_asks_nothing(tmp_path):
    c = Counters()
    assert limits(tmp_path, c).check() is None
    assert limits(tmp_path, c).room() is None
    assert c.counts == 0


def test_the_count_is_reused_for_a_second_and_commits_since_are_added(tmp_path):
    c = Counters()
    c.undelivered = (8, 800)
    lim = limits(tmp_path, c, max_messages=10)
    assert lim.check() is None
    c.committed = (1, 100)  # one commit since the count: 9 of 10
    c.now += CACHE_SECONDS / 2
    assert lim.check() is None
    c.committed = (2, 200)  # a burst inside the window still meets the quota
    assert lim.check() == "quota"
    assert c.counts == 1
    c.undelivered, c.committed = (3, 300), (2, 200)  # delivery drained the queue: seen at the next count
    c.now += CACHE_SECONDS
    assert lim.check() is None
    assert c.counts == 2


def test_a_clock_that_steps_back_counts_again(tmp_path):
    c = Counters()
    lim = limits(tmp_path, c, max_bytes=1000)
    lim.check()
    c.now -= 5
    lim.check()
    assert c.counts == 2


def test_the_octet_quota(tmp_path):
    c = Counters()
    c.undelivered = (1, 999)
    lim = limits(tmp_path, c, max_bytes=1000)
    assert lim.check() is None
    c.committed = (1, 1)
    assert lim.check() == "quota"


def test_set_and_forget_count_again(tmp_path):
    c = Counters()
    lim = limits(tmp_path, c, max_messages=5)
    lim.check()
    lim.forget()
    lim.check()
    c.undelivered = (5, 0)
    lim.set(min_free_bytes=0, max_messages=6, max_bytes=0)  # a reload raised the quota
    assert lim.check() is None
    assert c.counts == 3
    lim.set(min_free_bytes=0, max_messages=5, max_bytes=0)
    assert lim.check() == "quota"


def test_free_space_is_the_file_systems_less_the_wal(tmp_path):
    c = Counters()
    lim = limits(tmp_path, c, min_free_bytes=1)

    def file_system_free():
        st = os.statvfs(tmp_path)
        return st.f_bavail * st.f_frsize

    # Other writers on the disk move the free space a little between two looks: 16 MiB of slack.
    assert lim.free_bytes() == pytest.approx(file_system_free(), abs=1 << 24)
    wal = 1 << 36  # a sparse WAL of 64 GiB: its size counts, and it takes no space itself
    with open(tmp_path / "queue.db-wal", "wb") as f:
        f.truncate(wal)
    assert lim.free_bytes() == pytest.approx(file_system_free() - wal, abs=1 << 24)
    assert lim.room() == pytest.approx(file_system_free() - wal - 1, abs=1 << 24)
    lim.set(min_free_bytes=1 << 62, max_messages=0, max_bytes=0)
    assert lim.check() == "disk"
    assert lim.room() < 0


def test_a_spool_that_cannot_be_measured(tmp_path):
    c = Counters()
    lim = IntakeLimits(str(tmp_path / "gone" / "queue.db"), min_free_bytes=1, max_messages=0, max_bytes=0,
                       clock=lambda: c.now, committed=lambda: c.committed, count_undelivered=c.count)
    with pytest.raises(QueueError, match="cannot check free space"):
        lim.check()
    assert lim.room() is None  # before a commit: SQLite's own SQLITE_FULL decides


def test_a_message_needs_its_size_twice_and_its_rows():
    assert IntakeLimits.need(5000) == 10_000 + ROW_OVERHEAD
