"""The maildrop's format and the daemon's pickup against what any local user could leave in it."""

from __future__ import annotations

import os
import time

import pytest

from elemta import maildrop
from elemta.pickup import STALE, Pickup
from elemta.queue.model import NewRecipient
from elemta.queue.store import Store

DROP = maildrop.Drop(recipients=(NewRecipient("a@example.org", None, ("FAILURE",)),),
                     body=b"Subject: t\r\n\r\nhi\r\n", sender="s@example.org", full_name="S", envid="e1",
                     ret="HDRS", body_type="7BIT")


class Log:
    def __init__(self):
        self.events = []

    def __call__(self, event, **fields):
        self.events.append((event, fields))

    def names(self):
        return [e for e, _ in self.events]


@pytest.fixture
def setup(tmp_path):
    drop = tmp_path / "maildrop"
    drop.mkdir()
    store = Store(str(tmp_path / "queue.db"))
    store.open()
    log = Log()
    yield drop, store, log, Pickup(str(drop), store, "host.test", 10_000, log)
    store.close()


def messages(store: Store) -> list:
    import sqlite3

    conn = sqlite3.connect(store.path)
    try:
        return conn.execute("SELECT queue_id, sender, envid, ret FROM messages").fetchall()
    finally:
        conn.close()


def test_round_trip():
    assert maildrop.decode(maildrop.encode(DROP)) == DROP


@pytest.mark.parametrize("data, problem", [
    (b"hello", "not a maildrop file"),
    (maildrop.MAGIC + b"{not json\n", "not JSON"),
    (maildrop.MAGIC + b"[]\n", "not an object"),
    (maildrop.MAGIC + b'{"recipients": []}\n', "recipients: expected a non-empty list"),
    (maildrop.MAGIC + b'{"recipients": [{"address": "a@b"}], "body_type": "BINARYMIME"}\n', "body_type"),
    (maildrop.MAGIC + b'{"recipients": [{"address": "a@b"}], "body_type": "7BIT", "sender": "a\\nb"}\n', "sender"),
    (maildrop.MAGIC + b'{"recipients": [{"address": "a@b"}], "body_type": "7BIT", "ret": "ALL"}\n', "ret"),
])
def test_decode_refuses_what_sendmail_never_writes(data, problem):
    with pytest.raises(ValueError, match=problem):
        maildrop.decode(data)


def test_a_written_file_is_taken_with_its_owner_and_removed(setup):
    drop, store, log, pickup = setup
    name = maildrop.write(str(drop), DROP)
    assert maildrop.is_name(name) and os.stat(drop / name).st_mode & 0o777 == 0o740
    assert pickup.scan() == 1
    [(qid, sender, envid, ret)] = messages(store)
    assert (sender, envid, ret) == ("s@example.org", "e1", "HDRS")
    assert not list(drop.iterdir())
    event, fields = log.events[-1]
    assert (event, fields["uid"], fields["qid"]) == ("pickup", os.getuid(), qid)


def test_a_file_not_yet_marked_ready_waits_and_a_stale_one_goes(setup):
    drop, _, log, pickup = setup
    path = drop / maildrop.new_name()
    path.write_bytes(maildrop.encode(DROP))
    os.chmod(path, 0o640)  # sendmail still writing: no ready bit
    assert pickup.scan() == 0 and path.exists()
    old = time.time() - STALE - 10
    os.utime(path, (old, old))
    assert pickup.scan() == 0 and not path.exists()
    assert log.names() == ["pickup_rejected"]


@pytest.mark.parametrize("make", ["symlink", "hardlink", "fifo", "garbage", "too_big", "bad_address"])
def test_hostile_files_are_removed_and_logged(setup, tmp_path, make):
    drop, store, log, pickup = setup
    path = drop / maildrop.new_name()
    if make == "symlink":
        target = tmp_path / "secret"
        target.write_bytes(maildrop.encode(DROP))
        os.chmod(target, 0o740)
        path.symlink_to(target)
    elif make == "hardlink":
        name = maildrop.write(str(drop), DROP)
        os.link(drop / name, tmp_path / "other-link")
        path = drop / name
    elif make == "fifo":
        os.mkfifo(path, 0o740)
    else:
        body = {"garbage": b"junk", "too_big": maildrop.encode(maildrop.Drop(DROP.recipients, b"x" * 20_000)),
                "bad_address": maildrop.encode(maildrop.Drop((NewRecipient("not an address"),), b"x\r\n"))}[make]
        path.write_bytes(body)
        os.chmod(path, 0o740)
    assert pickup.scan() == 0
    assert not os.path.lexists(path)
    assert messages(store) == []
    assert log.names() == ["pickup_rejected"]
    if make == "symlink":
        assert (tmp_path / "secret").exists()  # never followed


def test_names_that_are_not_ours_are_left_alone(setup):
    drop, _, log, pickup = setup
    (drop / "README").write_text("x")
    assert pickup.scan() == 0 and (drop / "README").exists() and log.events == []


def test_without_a_sender_the_owner_is_the_sender_and_the_author(setup):
    drop, store, _, pickup = setup
    maildrop.write(str(drop), maildrop.Drop(DROP.recipients, b"Subject: s\r\n\r\n"))
    pickup.scan()
    [(qid, sender, _, _)] = messages(store)
    import pwd
    import sqlite3

    login = pwd.getpwuid(os.getuid()).pw_name
    assert sender == f"{login}@host.test"
    conn = sqlite3.connect(store.path)
    try:
        body = bytes(conn.execute("SELECT data FROM bodies WHERE queue_id = ?", (qid,)).fetchone()[0])
    finally:
        conn.close()
    assert f"\r\nFrom: {login}@host.test\r\n".encode() in body or f"<{login}@host.test>\r\n".encode() in body
    assert f"(elemta, from userid {os.getuid()})".encode() in body
