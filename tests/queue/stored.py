"""What a queue database holds, read with plain sqlite3 by the tests: elemta's Store only
writes (and answers intake checks), so reading rows back is the tests' own business."""

from __future__ import annotations

import contextlib
import sqlite3


@contextlib.contextmanager
def _reading(path: str):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def message(path: str, queue_id: str) -> dict | None:
    """The messages row as stored (priority as its integer), without the body."""
    with _reading(path) as conn:
        row = conn.execute("SELECT * FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    return dict(row) if row else None


def body(path: str, queue_id: str) -> bytes | None:
    with _reading(path) as conn:
        row = conn.execute("SELECT data FROM bodies WHERE queue_id = ?", (queue_id,)).fetchone()
    return bytes(row[0]) if row else None


def recipients(path: str, queue_id: str) -> list[dict]:
    with _reading(path) as conn:
        rows = conn.execute("SELECT * FROM recipients WHERE queue_id = ? ORDER BY id", (queue_id,)).fetchall()
    return [dict(row) for row in rows]


def message_count(path: str) -> int:
    """All messages in the database, delivered or not."""
    with _reading(path) as conn:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
