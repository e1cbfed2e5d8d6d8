#!/usr/bin/python3
"""Where should queued message bodies live: SQLite BLOBs or separate files?

Measures durable messages per second for:
  blob  body in a `bodies` row, written in the same transaction as the metadata
  file  body in its own file (write temp, fsync, rename), the directory fsynced
        once per batch, then the metadata rows committed
with group-commit batches of 1 and 16 messages and 5 KB and 100 KB bodies.
Both use WAL and synchronous=FULL, as the queue does, so every committed
batch is on disk. Single-threaded: the batch size stands in for the number
of sessions whose messages share one commit.

    /usr/bin/python3 bench/queue_body.py [--dir DIR] [--seconds 3]

Run it with --dir on the filesystem that will hold the spool: the answer
depends mostly on how expensive fsync is there.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time

SIZES = (5 * 1024, 100 * 1024)
BATCHES = (1, 16)


def open_db(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE messages (queue_id TEXT PRIMARY KEY, created REAL, size INTEGER, body_path TEXT)"
    )
    conn.execute("CREATE TABLE bodies (queue_id TEXT PRIMARY KEY, data BLOB)")
    return conn


def blob_batch(conn: sqlite3.Connection, spool: str, ids: list[str], body: bytes) -> None:
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO messages (queue_id, created, size) VALUES (?, ?, ?)", [(q, now, len(body)) for q in ids]
    )
    conn.executemany("INSERT INTO bodies (queue_id, data) VALUES (?, ?)", [(q, body) for q in ids])
    conn.execute("COMMIT")


def file_batch(conn: sqlite3.Connection, spool: str, ids: list[str], body: bytes) -> None:
    now = time.time()
    for qid in ids:
        tmp = os.path.join(spool, f".{qid}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the data, before the name points at it
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(spool, qid))
    # One directory fsync makes every rename in the batch durable.
    dfd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO messages (queue_id, created, size, body_path) VALUES (?, ?, ?, ?)",
        [(q, now, len(body), q) for q in ids],
    )
    conn.execute("COMMIT")


def run_cell(root: str, write, size: int, batch: int, seconds: float) -> tuple[float, int]:
    cell = tempfile.mkdtemp(dir=root)
    spool = os.path.join(cell, "bodies")
    os.mkdir(spool)
    conn = open_db(os.path.join(cell, "queue.db"))
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"y" * (size % 78)
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        ids = [f"{done + i:013d}" for i in range(batch)]
        write(conn, spool, ids, body)
        done += batch
    elapsed = time.perf_counter() - start
    conn.close()
    return done / elapsed, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to put the temporary spool (default: system temp)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per cell (default 3)")
    args = parser.parse_args()

    print(f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
          f"WAL + synchronous=FULL, {args.seconds:g} s per cell")
    with tempfile.TemporaryDirectory(prefix="elemta-bench-", dir=args.dir) as root:
        print(f"spool: {root}")
        print(f"{'storage':<8} {'body':>6} {'batch':>5} {'msg/s':>9} {'MB/s':>7} {'msgs':>7}")
        for size in SIZES:
            for batch in BATCHES:
                for name, write in (("blob", blob_batch), ("file", file_batch)):
                    rate, count = run_cell(root, write, size, batch, args.seconds)
                    print(f"{name:<8} {size // 1024:>4}KB {batch:>5} {rate:>9.0f} "
                          f"{rate * size / 1e6:>7.1f} {count:>7}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
