"""The writers' lock of queue databases (elemta/queue/db.py): flock on queue.db-lock."""

import fcntl
import os
import signal
import subprocess
import sys
import threading

import pytest

from elemta.queue import db
from tests.support import wait_for

# A second process that takes the write transaction and keeps it until told to commit.
HOLDER = """
import sys
from elemta.queue import db
conn = db.connect(sys.argv[1])
with db.write(conn):
    conn.execute("INSERT INTO t VALUES ('holder')")
    print("in", flush=True)
    sys.stdin.readline()
conn.close()
print("out", flush=True)
"""


@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "queue.db")
    conn = db.connect(p)
    with db.write(conn):
        conn.execute("CREATE TABLE t (who TEXT)")
    conn.close()
    return p


def lock_is_free(path: str) -> bool:
    fd = os.open(path + db.LOCK_SUFFIX, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also lets go of the lock if it was taken
    return True


def test_writable_connections_open_the_lock_file_readers_do_not(path):
    os.chmod(path, 0o640)
    os.unlink(path + db.LOCK_SUFFIX)
    reader = db.connect(path, readonly=True, create=False)
    assert reader.writer_lock is None
    assert not os.path.exists(path + db.LOCK_SUFFIX)
    writer = db.connect(path)
    assert writer.writer_lock is not None
    assert os.stat(path + db.LOCK_SUFFIX).st_mode & 0o777 == 0o640  # the database's own bits
    fd = writer.writer_lock
    writer.close()
    reader.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with its connection


def test_a_writer_in_another_process_makes_this_one_wait(path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "in\n"
        assert not lock_is_free(path)
        conn = db.connect(path, check_same_thread=False)
        order = []

        def write():
            with db.write(conn):
                conn.execute("INSERT INTO t VALUES ('waiter')")
            order.append("waiter done")

        waiter = threading.Thread(target=write)
        waiter.start()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "out\n"
        waiter.join(10)
        assert order == ["waiter done"]
        # The waiter began after the holder committed: its row comes second.
        assert [r[0] for r in conn.execute("SELECT who FROM t ORDER BY rowid")] == ["holder", "waiter"]
        assert lock_is_free(path)
        conn.close()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)


def test_two_connections_of_one_process_exclude_each_other(path):
    first, second = db.connect(path), db.connect(path, check_same_thread=False)
    entered, leave = threading.Event(), threading.Event()

    def write():
        with db.write(second):
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=write)
    with db.write(first):
        assert not lock_is_free(path)
        thread.start()
        # The second one is queued on the flock, not inside SQLite's busy handler: it
        # cannot have its transaction while the first one holds both locks.
        assert not entered.is_set()
    wait_for(entered.is_set, what="the second writer to get the lock")
    assert not lock_is_free(path)
    leave.set()
    thread.join(10)
    assert lock_is_free(path)
    first.close()
    second.close()


def test_lock_released_when_the_transaction_fails(path):
    conn = db.connect(path)
    with pytest.raises(RuntimeError), db.write(conn):
        conn.execute("INSERT INTO t VALUES ('rolled back')")
        raise RuntimeError("boom")
    assert lock_is_free(path)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    conn.close()


def test_without_a_lock_file_writes_still_work(path):
    os.unlink(path + db.LOCK_SUFFIX)
    os.mkdir(path + db.LOCK_SUFFIX)  # cannot be opened as a file, even by root
    conn = db.connect(path)
    assert conn.writer_lock is None
    with db.write(conn):
        conn.execute("INSERT INTO t VALUES ('x')")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    conn.close()


def test_sigtstp_waits_for_the_end_of_a_main_thread_transaction(path):
    conn = db.connect(path)
    with db.write(conn):
        assert signal.SIGTSTP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.SIGTSTP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files for others")
def test_root_gives_a_new_lock_file_to_the_database_owner(path):
    os.unlink(path + db.LOCK_SUFFIX)
    os.chown(path, 65534, 65534)
    conn = db.connect(path)
    st = os.stat(path + db.LOCK_SUFFIX)
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    conn.close()


def test_writers_turn_holds_the_lock_across_transactions_without_taking_it_twice(path):
    conn = db.connect(path)
    with db.writers_turn(conn):
        assert not lock_is_free(path)
        with db.write(conn):
            conn.execute("INSERT INTO t VALUES ('one')")
        # Still this writer's turn between its transactions: nobody else got in.
        assert not lock_is_free(path)
        with db.write(conn):
            conn.execute("INSERT INTO t VALUES ('two')")
    assert lock_is_free(path)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    conn.close()


def test_writers_turn_ends_when_its_body_raises(path):
    conn = db.connect(path)
    with pytest.raises(RuntimeError), db.writers_turn(conn):
        raise RuntimeError("boom")
    assert lock_is_free(path)
    assert not conn.in_turn
    with db.write(conn):  # and write() takes the lock itself again
        assert not lock_is_free(path)
    conn.close()


def test_writers_turn_without_a_lock_file_is_a_no_op(path):
    os.unlink(path + db.LOCK_SUFFIX)
    os.mkdir(path + db.LOCK_SUFFIX)
    conn = db.connect(path)
    assert conn.writer_lock is None
    with db.writers_turn(conn), db.write(conn):
        conn.execute("INSERT INTO t VALUES ('fine')")
    conn.close()
