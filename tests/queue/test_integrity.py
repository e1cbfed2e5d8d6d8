"""A damaged queue stops the start (issue 16, defect 5): a queue.db truncated to 0 bytes
was replaced by an empty queue and its mail vanished without a log line; 16 KiB of garbage
in the middle let the daemon start and fail deliveries one by one."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess

import pytest

from elemta.queue import integrity
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.store import Store
from tests.support import ELEMTA, ROOT, Daemon, as_root

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"

[delivery]
hold = true
"""


def fill(path, count: int = 60) -> None:
    with Store(str(path)) as store:
        for _ in range(count):
            store.enqueue(NewMessage(store.new_id(), "a@example.org", (NewRecipient("b@example.net"),),
                                     b"Subject: x\r\n\r\n" + os.urandom(2000).hex().encode() + b"\r\n"))
    (path.parent / (path.name + "-lock")).touch()  # as a daemon leaves it


def start(tmp_path) -> subprocess.CompletedProcess:
    conf = tmp_path / "elemta.toml"
    conf.write_text(as_root(CONFIG.replace("@SPOOL@", str(tmp_path / "spool"))))
    return subprocess.run([str(ELEMTA), "--config", str(conf)], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_queue_gone_empty_or_missing_is_refused_not_replaced(tmp_path, damage):
    path = tmp_path / "spool" / "queue.db"
    path.parent.mkdir()
    fill(path)
    if damage == "truncate":
        os.truncate(path, 0)
    else:
        path.unlink()
    result = start(tmp_path)
    assert result.returncode == 73, result.stderr
    [line] = result.stderr.splitlines()
    state = "empty (0 bytes)" if damage == "truncate" else "missing"
    assert line.startswith(f"elemta: server.spool_dir: {path} is {state}, but queue.db-lock beside it")
    assert "RECOVERY" in line
    assert not path.exists() or path.stat().st_size == 0  # nothing was created over it


def test_garbage_inside_the_database_is_refused(tmp_path):
    path = tmp_path / "spool" / "queue.db"
    path.parent.mkdir()
    fill(path, 200)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2 // 16384 * 16384)
        handle.write(os.urandom(16384))
    result = start(tmp_path)
    assert result.returncode == 73, result.stderr
    [line] = result.stderr.splitlines()
    assert "fails SQLite's integrity check" in line and "RECOVERY" in line


def test_a_first_start_on_an_empty_spool_makes_the_queue(tmp_path):
    integrity.check_presence(str(tmp_path / "queue.db"))  # nothing there: a new queue, fine
    (tmp_path / "queue.db").touch()
    integrity.check_presence(str(tmp_path / "queue.db"))  # empty and nothing beside it: fine


def test_quick_check_is_bounded_in_time(tmp_path):
    path = tmp_path / "queue.db"
    fill(path, 50)
    conn = sqlite3.connect(path)
    try:
        assert integrity.quick_check(conn) == []
        assert integrity.quick_check(conn, seconds=-1, every=1) is None  # out of time at once
    finally:
        conn.close()


@pytest.mark.skipif(not shutil.which("sqlite3"), reason="the sqlite3 program (Debian package sqlite3)")
def test_the_recovery_in_elemta_8_keeps_every_readable_message(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    path = spool / "queue.db"
    fill(path, 200)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2 // 16384 * 16384)
        handle.write(os.urandom(16384))
    assert start(tmp_path).returncode == 73
    # The commands of elemta(8), RECOVERY, as written there.
    script = r"""
set -e
cd "$1"
mv queue.db queue.db.damaged
[ -e queue.db-wal ] && mv queue.db-wal queue.db.damaged-wal
rm -f queue.db-shm
sqlite3 queue.db.damaged .dump \
  | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' | sqlite3 queue.db
sqlite3 queue.db "PRAGMA user_version = \
  $(sqlite3 queue.db.damaged 'PRAGMA user_version')"
"""
    subprocess.run(["sh", "-c", script, "sh", str(spool)], check=True, timeout=120, capture_output=True)
    man = (ROOT / "man" / "elemta.8").read_text()
    assert "sqlite3 queue.db.damaged .dump" in man and "PRAGMA user_version" in man
    conn = sqlite3.connect(path)
    try:
        messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        bodies = conn.execute("SELECT count(*) FROM bodies").fetchone()[0]
    finally:
        conn.close()
    assert messages == 200 and 150 < bodies <= 200  # what a 16 KiB page held is lost
    daemon = Daemon(tmp_path, CONFIG).start()  # starts on the copy, with every message in it
    try:
        assert len(daemon.messages()) >= 200  # (messages that lost their text may have bounced)
    finally:
        daemon.stop()
