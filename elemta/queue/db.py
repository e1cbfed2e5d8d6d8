"""Opening queue database connections with the settings the durability contract needs.

Every connection is in autocommit mode (isolation_level=None). Python 3.11's
default mode silently opens a DEFERRED transaction before INSERT/UPDATE and
keeps it open until someone calls commit(); a deferred transaction that later
needs the write lock can fail with SQLITE_BUSY without waiting, and a
forgotten implicit transaction pins the WAL. So all writes go through
write(), which takes the lock up front with BEGIN IMMEDIATE.

Writers of one database also queue on a lock file beside it (queue.db-lock, flock) before
BEGIN IMMEDIATE. When SQLite finds the write lock taken, its busy handler sleeps 1, 2, 5,
10 ... ms between tries (sqliteDefaultBusyCallback), so a writer that arrives while another
process commits loses at least a millisecond even if that commit ends 100 us later; with the
SMTP workers' commits and the delivery process's claims and results all writing, intake
stalled on those sleeps (bench/relay.py: 1,040 msgs/s with, 1,400 without). A flock waiter
is woken by the kernel the moment the holder lets go. The lock only orders writers: SQLite's
own locking still decides, so a writer without the lock file (no permission to create it)
is as correct as before, only slower under contention.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator

BUSY_TIMEOUT_MS = 5000
LOCK_SUFFIX = "-lock"  # the writers' lock file: queue.db-lock beside queue.db-wal and -shm


class LockingConnection(sqlite3.Connection):
    """A connection that may hold the file descriptor of its database's writers' lock.

    Each connection opens the lock file itself: flock() locks belong to an open file
    description, so two connections of one process sharing a descriptor would not exclude
    each other.
    """

    writer_lock: int | None = None
    in_turn = False  # writers_turn() holds the lock: write() does not take it again

    def close(self) -> None:
        super().close()
        fd, self.writer_lock = self.writer_lock, None
        if fd is not None:
            os.close(fd)


def _open_writer_lock(path: str) -> int | None:
    """Open (creating it like the database's -wal file) the lock file of `path`, or None.

    Created with the database's permission bits, and when root creates it for a database
    owned by someone else (elemtactl run as root beside a daemon running as elemta), given
    to the database's owner, as SQLite does with -wal and -shm; otherwise the daemon could
    not open it after root made it.
    """
    try:
        st = os.stat(path)
        fd = os.open(path + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, st.st_mode & 0o666)
    except OSError:
        return None  # e.g. a read-only spool directory: SQLite's busy handler alone then
    try:
        mine = os.fstat(fd)
        if os.geteuid() == 0 and mine.st_uid == 0 and st.st_uid != 0:
            os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass  # the lock still works for this process; others fall back as above
    return fd


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """PRAGMA journal_mode = WAL, retried while another process holds the lock.

    SQLite does not call the busy handler for this switch, so processes opening a new
    database at the same moment would get "database is locked" at once.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def connect(
    path: str, *, readonly: bool = False, check_same_thread: bool = True, create: bool = True
) -> sqlite3.Connection:
    """Open `path` with WAL, synchronous=FULL, foreign keys and a busy timeout.

    check_same_thread=False is for connections that are created on one thread
    and then used (never concurrently) by another, such as the store's writer
    connection and its pooled reader connections.

    create=False never creates the file: a missing database is an error
    (sqlite3.OperationalError), and a readonly connection is opened with the
    file's mode=ro, so it also works without write permission on the file.
    elemtactl opens the daemon's queue this way, so a mistyped spool_dir
    reports itself instead of leaving an empty queue.db behind.
    """
    target, uri = path, False
    if not create:
        quoted = urllib.parse.quote(os.path.abspath(path))
        target, uri = f"file:{quoted}?mode={'ro' if readonly else 'rw'}", True
    conn = sqlite3.connect(
        target,
        isolation_level=None,
        check_same_thread=check_same_thread,
        timeout=BUSY_TIMEOUT_MS / 1000,  # also covers the pragmas below
        uri=uri,
        factory=LockingConnection,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Only takes effect when the file is created.  Bodies are BLOBs: 16 KiB pages write
        # a 100 KB message in a quarter of the WAL frames (system calls) of 4 KiB pages,
        # 13% faster in bench/accept.py at 100 KB and no slower at 5 KB.
        conn.execute("PRAGMA page_size = 16384")
        # Changing journal_mode needs a write lock even when nothing changes, so
        # look first: readers and second processes then never block on it.
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        # A reader cannot switch (and should not: it is the writers' database).
        if mode.lower() != "wal" and not readonly:
            mode = _switch_to_wal(conn)
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch {path} to WAL (journal_mode is {mode})")
        # FULL: in WAL mode this fsyncs the WAL at every commit, which is what
        # makes the 250 reply after DATA a promise (NORMAL could lose the last
        # transactions on power loss).
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            conn.writer_lock = _open_writer_lock(path)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: BEGIN IMMEDIATE, COMMIT on success, ROLLBACK on error.

    Under the writers' lock (see the module docstring) when the connection has one.
    """
    lock = None if getattr(conn, "in_turn", False) else getattr(conn, "writer_lock", None)
    with _writers_lock(lock):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # Some errors (SQLITE_FULL, SQLITE_IOERR, ...) make SQLite roll back by
            # itself; a second ROLLBACK would then fail and hide the real error.
            # If ROLLBACK itself fails, the original error is the one worth reporting.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


@contextlib.contextmanager
def writers_turn(conn: sqlite3.Connection) -> Iterator[None]:
    """Hold the writers' lock across several write() transactions of conn and what comes
    between them.

    For a group commit: what arrives while a writer waits for its turn can still join its
    batch if the batch is gathered once the turn has come.  Under contention batches then
    grow instead of transactions queueing up behind each other, each with its own fsync.
    Only one thread may use conn meanwhile (the caller's own lock sees to that).
    """
    if not isinstance(conn, LockingConnection) or conn.in_turn or conn.writer_lock is None:
        yield
        return
    with _writers_lock(conn.writer_lock):
        conn.in_turn = True
        try:
            yield
        finally:
            conn.in_turn = False


@contextlib.contextmanager
def _writers_lock(fd: int | None) -> Iterator[None]:
    """Hold the flock on `fd` (if any); in the main thread, with SIGTSTP blocked.

    The wait has no time limit, unlike SQLite's busy timeout: the holder is inside one
    short transaction. Only a process stopped while it holds the lock would make the others
    wait, so an interactive elemtactl suspended with ^Z stops only after its transaction
    (SIGINT still interrupts and rolls back).
    """
    if fd is None:
        yield
        return
    mask = None
    if threading.current_thread() is threading.main_thread():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTSTP})
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
