"""The password file (elemta/passwords.py) on real files: reloads, writes, errors."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from elemta import passhash
from elemta import passwords as pw
from elemta.errors import ElemtaError
from elemta.passwords import (
    BadPassword,
    BadUserName,
    NoSuchUser,
    PasswordFile,
    PasswordFileUnavailable,
    PasswordFileWriteError,
    User,
    UserExists,
)
from tests.support import ROOT, as_nobody


class Clock:
    """A monotonic clock the test moves: reloads are looked for at most once a second."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "passwd")


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Counts the scrypt computations (the real ones still run)."""
    calls = []
    real = passhash._scrypt

    def counting(*args):
        calls.append(args[2:5])
        return real(*args)

    monkeypatch.setattr(passhash, "_scrypt", counting)
    return calls


@pytest.mark.parametrize(("name", "ok"), [
    ("alice@example.com", True), ("zoë@exämple.org", True), ("bob", True),
    ("", False), ("a:b", False), ("a b", False), ("a\tb", False), ("a\x00b", False), ("a\x7fb", False),
    ("a\u0085b", False), ("a\u00a0b", False), ("x" * 256, False),
])
def test_user_names(name, ok):
    assert (pw.user_name_problem(name) is None) == ok


# ---- reading ----------------------------------------------------------------------------------


def test_round_trip(path):
    f = PasswordFile(path)
    assert f.set("Alice@Example.COM", "s3cret pass") is False
    assert f.set("bob@example.org", "hunter2", cram_md5=True) is False
    assert f.check_password("alice@example.com", "s3cret pass") is True
    assert f.check_password("ALICE@example.com", "s3cret pass") is True  # names without case
    assert f.check_password("alice@example.com", "S3cret pass") is False
    assert f.check_password("carol@example.com", "s3cret pass") is False
    assert f.users() == [User("alice@example.com", False), User("bob@example.org", True)]
    assert f.cram_md5_secret("bob@example.org") == b"hunter2"
    assert f.cram_md5_secret("alice@example.com") is None
    assert f.cram_md5_secret("nobody") is None
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice@example.com", "bob@example.org"]
    assert "s3cret" not in "".join(lines) and "hunter2" not in "".join(lines)
    assert lines[1].split(":")[2] == base64.b64encode(b"hunter2").decode()
    assert f.problems() == []


def test_a_missing_file_is_no_users(path):
    f = PasswordFile(path)
    assert f.check_password("alice", "x") is False
    assert f.cram_md5_secret("alice") is None
    assert f.users() == []


def test_a_file_that_cannot_be_read_is_unavailable(tmp_path):
    """A directory where the file should be: open() fails as for an unreadable file."""
    where = tmp_path / "passwd"
    where.mkdir()
    f = PasswordFile(str(where))
    assert f.check_password("alice", "x") is None
    with pytest.raises(PasswordFileUnavailable, match="passwd: Is a directory") as caught:
        f.cram_md5_secret("alice")
    assert not caught.value.permission and isinstance(caught.value, ElemtaError)
    with pytest.raises(PasswordFileUnavailable):
        f.users()


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_a_file_without_read_permission_is_unavailable():
    """As a user who may not read the file (root reads everything: then as nobody)."""
    directory = tempfile.mkdtemp(prefix="elemta-passwords-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "passwd")
        PasswordFile(path).set("alice", "s3cret")
        os.chmod(path, 0o600)
        script = ("import sys; from elemta.passwords import PasswordFile, PasswordFileUnavailable\n"
                  "f = PasswordFile(sys.argv[1])\n"
                  "try:\n    f.cram_md5_secret('alice')\nexcept PasswordFileUnavailable as e:\n"
                  "    print(f.check_password('alice', 's3cret'), e.permission, e)\n")
        command, env = [sys.executable, "-c", script, path], {**os.environ, "PYTHONPATH": str(ROOT)}
        if os.geteuid() == 0:
            command, env = as_nobody(command)  # on a copy of elemta that nobody may read
        else:
            os.chmod(path, 0)
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                              env=env, cwd=directory)
    finally:
        shutil.rmtree(directory)
    assert done.stdout == f"None True {path}: Permission denied\n", done.stderr


def test_bad_lines_are_skipped_with_a_reason(path):
    good = pw.hash_password("pw", ln=4)
    with open(path, "w", encoding="utf-8") as out:
        out.write(f"# users of mx1\n\nalice:{good}\nno colon here\nbob:$1$md5crypt$xyz\n"
                  f"carol:{good}:not*base64\ndave:{good}:x:y\nALICE:{good}\ne ve:{good}\n"
                  f"frank:{good}:\nzoë:{good}\n   # an indented comment\n")
    f = PasswordFile(path)
    assert [u.name for u in f.users()] == ["alice", "zoë"]
    assert f.problems() == [
        "line 4: 1 ':'-separated fields, not user:hash or user:hash:cram; line skipped",
        "line 5: the hash is not $scrypt$ln=N,r=N,p=N$salt$key; line skipped",
        "line 6: the CRAM-MD5 secret is not base64; line skipped",
        "line 7: 4 ':'-separated fields, not user:hash or user:hash:cram; line skipped",
        "line 8: alice again (first on line 3); line skipped",
        "line 9: a user name cannot contain white space; line skipped",
        "line 10: the CRAM-MD5 secret is empty; line skipped",
    ]
    assert f.check_password("alice", "pw") and f.check_password("zoë", "pw")
    assert f.check_password("carol", "pw") is False


def test_another_writer_is_seen_after_at_most_a_second(path):
    clock = Clock()
    reader = PasswordFile(path, clock=clock)
    writer = PasswordFile(path)
    writer.set("alice", "old password")
    assert reader.check_password("alice", "old password") is True
    writer.set("alice", "new password", exists=True)
    writer.set("bob", "bob's")
    clock.now += 0.5  # looked at less than a second ago: not looked at again
    assert reader.check_password("alice", "old password") is True
    assert reader.check_password("bob", "bob's") is False
    clock.now += 0.5
    assert reader.check_password("alice", "old password") is False  # the cached success is gone too
    assert reader.check_password("alice", "new password") is True
    assert reader.check_password("bob", "bob's") is True
    writer.delete("bob")
    clock.now += 1
    assert reader.check_password("bob", "bob's") is False
    assert reader.users() == [User("alice", False)]


def test_a_file_that_appears_disappears_or_becomes_unreadable(tmp_path, path):
    clock = Clock()
    reader = PasswordFile(path, clock=clock)
    assert reader.users() == []
    PasswordFile(path).set("alice", "pw")
    clock.now += 1
    assert reader.check_password("alice", "pw") is True
    os.rename(path, str(tmp_path / "elsewhere"))
    os.mkdir(path)
    clock.now += 1
    assert reader.check_password("alice", "pw") is None
    os.rmdir(path)
    clock.now += 1
    assert reader.check_password("alice", "pw") is False


def test_an_unknown_user_costs_one_hash_too(path, scrypt_calls):
    f = PasswordFile(path)
    f.set("alice", "pw")
    f.check_password("alice", "warm up the dummy")  # the reader's dummy hash is made on first use
    f.check_password("nobody", "pw")
    scrypt_calls.clear()
    assert f.check_password("nobody", "pw") is False
    assert f.check_password("alice", "wrong") is False
    assert scrypt_calls == [(passhash.SCRYPT_LN, passhash.SCRYPT_R, passhash.SCRYPT_P)] * 2


def test_successes_are_cached_for_a_while_failures_never(path, scrypt_calls):
    clock = Clock()
    f = PasswordFile(path, clock=clock)
    PasswordFile(path).set("alice", "pw")
    scrypt_calls.clear()
    assert f.check_password("alice", "pw") and f.check_password("Alice", "pw")
    assert len(scrypt_calls) == 1
    assert not f.check_password("alice", "pw2") and not f.check_password("alice", "pw2")
    assert len(scrypt_calls) == 3
    clock.now += pw.CACHE_SECONDS + 1
    assert f.check_password("alice", "pw")
    assert len(scrypt_calls) == 4


# ---- writing ----------------------------------------------------------------------------------


def test_add_and_passwd_rules(path):
    f = PasswordFile(path)
    f.set("alice", "one", exists=False)
    with pytest.raises(UserExists, match="user alice exists"):
        f.set("ALICE", "two", exists=False)
    with pytest.raises(NoSuchUser, match="no such user: bob"):
        f.set("bob", "two", exists=True)
    assert f.set("alice", "two", exists=True) is True
    assert f.check_password("alice", "two") and not f.check_password("alice", "one")
    assert [u.name for u in f.users()] == ["alice"]
    assert f.delete("Alice") is True
    assert f.delete("alice") is False
    assert f.users() == []


@pytest.mark.parametrize(("user", "password", "error"), [
    ("a:b", "pw", BadUserName), ("a b", "pw", BadUserName), ("", "pw", BadUserName),
    ("alice", "", BadPassword), ("alice", "two\nlines", BadPassword), ("alice", "nul\0", BadPassword),
])
def test_bad_names_and_passwords_are_refused(path, user, password, error):
    with pytest.raises(error) as caught:
        PasswordFile(path).set(user, password)
    assert not os.path.exists(path)
    if password:
        assert password not in str(caught.value)


def test_the_cram_md5_secret_only_when_asked(path):
    f = PasswordFile(path)
    f.set("alice", "one")
    assert f.cram_md5_secret("alice") is None
    f.set("alice", "two", cram_md5=True)
    assert f.cram_md5_secret("alice") == b"two"
    f.set("alice", "three", cram_md5=None)  # kept, with the new password
    assert f.cram_md5_secret("alice") == b"three"
    f.set("alice", "four", cram_md5=False)
    assert f.cram_md5_secret("alice") is None
    f.set("alice", "five", cram_md5=None)
    assert f.cram_md5_secret("alice") is None


def test_writes_keep_comments_and_lines_they_do_not_own(path):
    good = pw.hash_password("pw", ln=4)
    original = f"# users\nalice:{good}\nbroken line\n\nbob:{good}\n"
    with open(path, "w", encoding="utf-8") as out:
        out.write(original)
    f = PasswordFile(path)
    f.set("bob", "new")
    f.set("carol", "pw")
    f.delete("alice")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    assert lines[:3] == ["# users", "broken line", ""]
    assert [line.split(":")[0] for line in lines[3:]] == ["bob", "carol"]
    assert lines[3] != f"bob:{good}"


def test_a_new_file_is_0640_and_an_existing_file_keeps_its_mode_and_group(tmp_path, path):
    PasswordFile(path).set("alice", "pw")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.chmod(path, 0o600)
    group = os.getgid()
    if os.geteuid() == 0:
        group = 65534
        os.chown(path, 0, group)
    PasswordFile(path).set("bob", "pw")
    st = os.stat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, group)
    assert sorted(os.listdir(tmp_path)) == ["passwd", "passwd.lock"]  # no temporary file left


def test_a_write_where_there_is_no_directory_fails_cleanly(tmp_path):
    f = PasswordFile(str(tmp_path / "missing" / "passwd"))
    with pytest.raises(PasswordFileWriteError, match="No such file or directory") as caught:
        f.set("alice", "s3cret")
    assert "s3cret" not in str(caught.value) and not caught.value.permission


def test_a_failed_rename_leaves_the_old_file_and_no_temporary_one(tmp_path, path, monkeypatch):
    """A rename that fails (a full or read-only file system, provoked here: root may rename
    anything) leaves the file as it was."""
    f = PasswordFile(path)
    f.set("alice", "pw")
    before = Path(path).read_text(encoding="utf-8")

    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PasswordFileWriteError, match="passwd: Read-only file system"):
        f.set("bob", "pw")
    monkeypatch.undo()
    assert Path(path).read_text(encoding="utf-8") == before
    assert sorted(os.listdir(tmp_path)) == ["passwd", "passwd.lock"]


def test_a_file_that_cannot_be_read_cannot_be_changed(tmp_path, path):
    os.mkdir(path)
    with pytest.raises(PasswordFileWriteError, match="Is a directory"):
        PasswordFile(path).set("alice", "pw")
    assert sorted(os.listdir(tmp_path)) == ["passwd", "passwd.lock"]


def test_concurrent_writers_lose_nothing(path):
    """Writers (each its own PasswordFile, as separate elemtactl runs) add users at once."""
    errors = []

    def add(prefix):
        f = PasswordFile(path)
        try:
            for n in range(8):
                f.set(f"{prefix}{n}@example.com", f"pw-{prefix}{n}")
        except (ElemtaError, OSError) as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(prefix,)) for prefix in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    f = PasswordFile(path)
    names = sorted(u.name for u in f.users())
    assert names == sorted(f"{p}{n}@example.com" for p in "abcd" for n in range(8))
    assert f.check_password("b5@example.com", "pw-b5")
