"""Opening queue database connections with the settings the durability contract needs.

Every connection is in autocommit mode (isolation_level=None). Python 3.11's
default mode silently opens a DEFERRED transaction before INSERT/UPDATE and
keeps it open until someone calls commit(); a deferred transaction that later
needs the write lock can fail with SQLITE_BUSY without waiting, and a
forgotten implicit transaction pins the WAL. So all writes go through
write(), which takes the lock up front with BEGIN IMMEDIATE.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator

BUSY_TIMEOUT_MS = 5000


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
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: BEGIN IMMEDIATE, COMMIT on success, ROLLBACK on error."""
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
