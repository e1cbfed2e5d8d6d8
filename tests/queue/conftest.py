"""What the queue's tests of claims and results share: a queue file with a fake clock, a
Store that fills it, the WorkQueue of a scheduler (and of another one), a raw connection."""

import sqlite3

import pytest

from elemta.queue.store import Store
from elemta.queue.work import WorkQueue

T0 = 1_700_000_000.0
OWNER = "mta1.example:100"
OTHER = "mta2.example:200"


class FakeClock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "spool" / "queue.db")


@pytest.fixture
def store(db_path, clock):
    s = Store(db_path, clock=clock)
    s.open()
    yield s
    s.close()


def open_work(db_path, clock, owner=OWNER, log=None):
    wq = WorkQueue(db_path, owner, clock=clock, **({"log": log} if log is not None else {}))
    wq.open()
    return wq


@pytest.fixture
def work(store, db_path, clock):
    wq = open_work(db_path, clock)
    yield wq
    wq.close()


@pytest.fixture
def other(store, db_path, clock):
    """A second scheduler process on the same database."""
    wq = open_work(db_path, clock, OTHER)
    yield wq
    wq.close()


@pytest.fixture
def raw(store, db_path):
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    yield conn
    conn.close()
