"""`elemtactl user ...` through click's CliRunner and as a real process, on real password files."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from elemta.cli import ctl_user, ctlbase
from elemta.cli.elemtactl import main
from elemta.cli.render import Output
from elemta.passwords import PasswordFile, User
from tests.support import ROOT, as_nobody, cli_runner

ELEMTACTL = ROOT / "bin" / "elemtactl"


@pytest.fixture
def passwd(tmp_path):
    return str(tmp_path / "passwd")


@pytest.fixture
def conf(tmp_path, passwd):
    path = tmp_path / "elemta.toml"
    path.write_text(f'[smtp]\nauth_file = "{passwd}"\n')
    return str(path)


@pytest.fixture
def run(conf):
    def invoke(*args, input=None, config=conf):
        runner = cli_runner()
        return runner.invoke(main, [*(["--config", config] if config else []), *args], input=input)

    return invoke


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def fails(result, code):
    """The command failed with `code` and said why in exactly one line on stderr."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("elemtactl"), result.stderr
    return result.stderr


def add(run, name, password="s3cret pass", *more):
    return ok(run("user", "add", "--password-stdin", *more, name, input=password + "\n"))


# ---- add, passwd, delete, list ---------------------------------------------------------------


def test_add_then_the_daemon_side_checks_the_password(run, passwd):
    assert add(run, "Alice@Example.com").stdout == "added user alice@example.com\n"
    f = PasswordFile(passwd)
    assert f.check_password("alice@example.com", "s3cret pass") is True
    assert f.check_password("alice@example.com", "s3cret pass\n") is False  # the line ending is not in it
    assert f.cram_md5_secret("alice@example.com") is None
    assert stat.S_IMODE(os.stat(passwd).st_mode) == 0o640


def test_add_with_cram_md5_and_list(run, passwd):
    add(run, "alice@example.com")
    assert add(run, "bob@example.org", "hunter2", "--cram-md5").stdout == (
        "added user bob@example.org with a CRAM-MD5 secret\n")
    assert PasswordFile(passwd).cram_md5_secret("bob@example.org") == b"hunter2"
    result = ok(run("user", "list"))
    assert (result.stdout, result.stderr) == ("alice@example.com\tno\nbob@example.org\tyes\n", "")
    listing = json.loads(ok(run("user", "list", "--json")).stdout)
    assert listing == {"file": passwd, "problems": [],
                       "users": [{"name": "alice@example.com", "cram_md5": False},
                                 {"name": "bob@example.org", "cram_md5": True}]}
    assert "$scrypt$" not in result.stdout


def test_passwd_changes_the_password_and_the_cram_md5_secret(run, passwd):
    add(run, "bob@example.org", "old", "--cram-md5")
    result = ok(run("user", "passwd", "--password-stdin", "BOB@example.org", input="new\n"))
    assert result.stdout == "changed the password of bob@example.org and its CRAM-MD5 secret\n"
    f = PasswordFile(passwd)
    assert (f.check_password("bob@example.org", "new"), f.check_password("bob@example.org", "old")) == (True, False)
    assert f.cram_md5_secret("bob@example.org") == b"new"
    assert ok(run("user", "passwd", "--no-cram-md5", "--password-stdin", "bob@example.org",
                  input="newer\n")).stdout == "changed the password of bob@example.org\n"
    assert PasswordFile(passwd).users() == [User("bob@example.org", False)]
    ok(run("user", "passwd", "--cram-md5", "--password-stdin", "bob@example.org", input="newest\n"))
    assert PasswordFile(passwd).cram_md5_secret("bob@example.org") == b"newest"


def test_delete(run, passwd):
    add(run, "alice@example.com")
    add(run, "bob@example.org")
    assert ok(run("user", "delete", "Alice@example.com")).stdout == "deleted user alice@example.com\n"
    assert PasswordFile(passwd).users() == [User("bob@example.org", False)]
    assert fails(run("user", "delete", "alice@example.com"), 67) == (
        "elemtactl: no such user: alice@example.com\n")


def test_an_empty_or_missing_file_lists_no_users(run, passwd):
    result = ok(run("user", "list"))
    assert (result.stdout, result.stderr) == ("", f"No users in {passwd}.\n")
    assert json.loads(ok(run("user", "list", "--json")).stdout)["users"] == []
    assert not os.path.exists(passwd)


def test_list_warns_of_lines_the_daemon_skips(run, passwd):
    add(run, "alice@example.com")
    with open(passwd, "a", encoding="utf-8") as out:
        out.write("bob:plaintext-password\n")
    result = ok(run("user", "list"))
    assert result.stdout == "alice@example.com\tno\n"
    assert result.stderr == (f"elemtactl: warning: {passwd}: line 2: the hash is not "
                             "$scrypt$ln=N,r=N,p=N$salt$key; line skipped\n")
    assert "plaintext-password" not in result.stderr
    assert json.loads(ok(run("user", "list", "--json")).stdout)["problems"] == [
        "line 2: the hash is not $scrypt$ln=N,r=N,p=N$salt$key; line skipped"]


def test_a_terminal_gets_a_table(run, monkeypatch):
    add(run, "alice@example.com", "pw", "--cram-md5")
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None)
    monkeypatch.setattr(ctl_user, "Output", functools.partial(Output, terminal=True, console=console))
    ok(run("user", "list"))
    text = buffer.getvalue()
    assert "User" in text and "CRAM-MD5" in text and "alice@example.com" in text and "yes" in text


def test_file_option_overrides_the_configuration(run, tmp_path, passwd):
    other = str(tmp_path / "other-passwd")
    ok(run("user", "--file", other, "add", "--password-stdin", "carol", input="pw\n"))
    assert PasswordFile(other).users() == [User("carol", False)]
    assert not os.path.exists(passwd)
    # No configuration is read with --file: a missing one does not matter.
    result = ok(run("user", "--file", other, "list", config=str(tmp_path / "missing.toml")))
    assert result.stdout == "carol\tno\n"


# ---- passwords from the terminal ----------------------------------------------------------------


def test_the_password_is_asked_twice_without_echo(run, passwd, monkeypatch):
    monkeypatch.setattr(ctlbase, "_interactive", lambda: True)
    result = ok(run("user", "add", "alice", input="one\ntwo\npw pw\npw pw\n"))
    assert result.stdout.endswith("added user alice\n")  # after CliRunner's echoed line ends
    assert "do not match" in result.stderr and "one" not in result.stderr + result.stdout
    assert PasswordFile(passwd).check_password("alice", "pw pw") is True


def test_without_a_terminal_the_password_must_come_from_stdin(run, passwd):
    assert "use --password-stdin" in fails(run("user", "add", "alice", input="pw\npw\n"), 64)
    assert not os.path.exists(passwd)


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "stdin", "code", "message"), [
    (["add", "--password-stdin", "a:b"], "pw\n", 65, "cannot contain ':'"),
    (["add", "--password-stdin", "a b"], "pw\n", 65, "white space"),
    (["add", "--password-stdin", ""], "pw\n", 65, "empty"),
    (["add", "--password-stdin", "alice"], "", 65, "no password on standard input"),
    (["add", "--password-stdin", "alice"], "\n", 65, "no password on standard input"),
    (["add", "--password-stdin", "alice@example.com"], "pw\n", 73, "exists (use passwd"),
    (["passwd", "--password-stdin", "nobody"], "pw\n", 67, "no such user: nobody"),
    (["passwd", "--password-stdin", "a:b"], "pw\n", 65, "cannot contain ':'"),
    (["add", "alice", "--password", "x"], "", 64, "No such option"),
    (["add"], "", 64, "Missing argument"),
    (["frobnicate"], "", 64, "No such command"),
])
def test_errors_are_one_line_with_their_exit_status(run, passwd, args, stdin, code, message):
    add(run, "alice@example.com")
    before = Path(passwd).read_text(encoding="utf-8")
    assert message in fails(run("user", *args, input=stdin), code)
    assert Path(passwd).read_text(encoding="utf-8") == before


def test_a_password_file_that_cannot_be_read_or_written(run, tmp_path):
    directory = tmp_path / "is-a-directory"
    directory.mkdir()
    assert "Is a directory" in fails(run("user", "--file", str(directory), "list"), 69)
    missing = tmp_path / "no-such-dir" / "passwd"
    assert "No such file or directory" in fails(
        run("user", "--file", str(missing), "add", "--password-stdin", "alice", input="pw\n"), 73)


def test_the_password_never_reaches_the_output(run):
    secret = "very-secret-password"
    result = run("user", "add", "--password-stdin", "bad:name", input=secret + "\n")
    assert secret not in result.stdout + result.stderr
    add(run, "alice", secret)
    for args in (["list"], ["list", "--json"]):
        assert secret not in ok(run("user", *args)).stdout


# ---- as a real process ----------------------------------------------------------------------


def test_the_launcher_adds_a_user_from_stdin(conf, passwd):
    def elemtactl_run(*args, stdin=""):
        return subprocess.run([str(ELEMTACTL), "--config", conf, "user", *args], input=stdin, capture_output=True,
                              text=True, timeout=60, check=False)

    done = elemtactl_run("add", "--password-stdin", "--cram-md5", "dave@example.net", stdin="pässwörd\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "added user dave@example.net with a CRAM-MD5 secret\n",
                                                           "")
    f = PasswordFile(passwd)
    assert f.check_password("dave@example.net", "pässwörd") is True
    assert f.cram_md5_secret("dave@example.net") == "pässwörd".encode()
    done = elemtactl_run("list", "--json")
    assert json.loads(done.stdout)["users"] == [{"name": "dave@example.net", "cram_md5": True}]
    done = elemtactl_run("add", "--password-stdin", "dave@example.net", stdin="x\n")
    assert (done.returncode, done.stderr.count("\n")) == (73, 1)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_no_permission_exits_77():
    """As a user who may read the config but not the password file (root: as nobody)."""
    readable = tempfile.mkdtemp(prefix="elemtactl-user-")
    try:
        os.chmod(readable, 0o755)
        passwd = os.path.join(readable, "passwd")
        PasswordFile(passwd).set("alice", "pw")
        os.chmod(passwd, 0o600)
        commands = [([str(ELEMTACTL), "user", "--file", passwd, *args], None) for args in (
            ["list"], ["delete", "alice"], ["add", "--password-stdin", "bob"])]
        if os.geteuid() == 0:
            commands = [as_nobody(c) for c, _ in commands]
        else:
            os.chmod(passwd, 0)
            os.chmod(readable, 0o555)
        results = [subprocess.run(c, input="pw\n", capture_output=True, text=True, timeout=60, check=False,
                                  env=env) for c, env in commands]
        users = PasswordFile(passwd).users() if os.geteuid() == 0 else None
    finally:
        os.chmod(readable, 0o755)
        shutil.rmtree(readable)
    for done in results:
        assert done.returncode == 77, done.stderr
        assert done.stderr.startswith("elemtactl: ") and "Permission denied" in done.stderr
        assert done.stderr.count("\n") == 1
    if users is not None:
        assert users == [User("alice", False)]
