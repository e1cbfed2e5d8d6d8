"""Is the queue database the one elemta wrote?  Checked at start, before any mail is taken.

SQLite makes a new, empty database wherever it is asked to open one, so a queue.db that was
truncated or deleted would silently become an empty queue, and the mail in it would be gone
without a word.  A spool that has held a queue keeps queue.db-lock (and -wal and -shm while
a process runs or after a crash) beside it: a missing or empty queue.db beside them is a
damaged queue, and elemta refuses to start on it.  A database damaged inside (a disk error,
a bad copy) is found by SQLite's quick_check, bounded in time so that a huge queue does not
hold the start back for long.  Recovery is described in elemta(8), RECOVERY.
"""

from __future__ import annotations

import os
import sqlite3
import time

from elemta.errors import QueueError

TRACES = ("-wal", "-shm", "-lock")  # files beside queue.db once a queue has lived there
START_CHECK_SECONDS = 30.0
MAX_PROBLEMS = 10


class DamagedQueue(QueueError):
    """The queue database is missing, empty or inconsistent where a queue was."""


def check_presence(path: str) -> None:
    """DamagedQueue when queue.db is missing or empty but files beside it show a queue was
    there; nothing for a spool that never held one (a first start)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        size = None
    if size:
        return
    traces = [os.path.basename(path) + suffix for suffix in TRACES if os.path.lexists(path + suffix)]
    if traces:
        state = "missing" if size is None else "empty (0 bytes)"
        raise DamagedQueue(
            f"{path} is {state}, but {', '.join(traces)} beside it show a queue was here: "
            f"refusing to start an empty queue over lost mail (see elemta(8), RECOVERY; to start "
            f"afresh on purpose, remove {', '.join(traces)} too)"
        )


def quick_check(conn: sqlite3.Connection, seconds: float = START_CHECK_SECONDS,
                every: int = 10_000, full: bool = False) -> list[str] | None:
    """SQLite's PRAGMA quick_check (integrity_check when full: indexes against their tables
    too), stopped after `seconds` (looked at every `every` virtual machine steps): [] when the
    database is sound, the problems it found (at most MAX_PROBLEMS), or None if it did not
    finish in time."""
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), every)
    pragma = "integrity_check" if full else "quick_check"
    try:
        rows = conn.execute(f"PRAGMA {pragma}({MAX_PROBLEMS})").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc).lower():
            return None
        return [str(exc)]
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed", "file is not a database"
        return [str(exc)]
    finally:
        conn.set_progress_handler(None, 0)
    problems = [str(row[0]) for row in rows]
    return [] if problems == ["ok"] else problems
