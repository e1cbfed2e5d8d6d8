"""The daemon started as root becomes server.user; started as that user (as systemd does) it
runs as it; files it creates are not for others; secrets others can read stop the start."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from elemta import filemodes, privileges
from elemta.config import Config, ServerConfig
from elemta.errors import ConfigError
from tests.support import ELEMTA, Daemon, as_nobody, from_readable_copy, wait_for

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to become another user)")
NOBODY = 65534

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
user = "nobody"
@SERVER@

[smtp]
local_domains = ["example.test"]

[local]
transport = "maildir:@SPOOL@/../mail/%u"
"""




def daemon_in(directory: Path, config: str, **kwargs) -> Daemon:
    daemon = Daemon(directory, config, **kwargs)
    os.chmod(daemon.config_path, 0o644)  # the service user reads it, as /etc/elemta/elemta.toml
    return daemon


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def family(pid: int) -> list[int]:
    """pid and its children (the supervisor's workers and delivery process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def send(port: int, rcpt: str = "user@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.org", [rcpt], b"Subject: t\r\n\r\nhello\r\n")


@root_only
@pytest.mark.parametrize("extra", ["", "workers = 2", "delivery_process = false"])
def test_started_as_root_every_process_runs_as_the_user(open_dir, extra):
    (open_dir / "mail").mkdir(mode=0o700)  # the mailboxes' parent, the service's as an admin made it
    os.chown(open_dir / "mail", NOBODY, NOBODY)
    daemon = daemon_in(open_dir, CONFIG.replace("@SERVER@", extra), wrap=from_readable_copy).start()
    try:
        pids = wait_for(lambda: len(family(daemon.proc.pid)) >= (1 if "false" in extra else 2) and family(daemon.proc.pid),
                        what="the worker processes")
        for pid in pids:
            fields = status(pid)
            assert fields["Uid"].split() == [str(NOBODY)] * 4, pid
            assert fields["Gid"].split() == [str(NOBODY)] * 4, pid
            assert int(fields["CapEff"], 16) == 1 << privileges.CAP_NET_BIND_SERVICE, pid
            assert int(fields["CapPrm"], 16) == 1 << privileges.CAP_NET_BIND_SERVICE, pid
            assert fields["NoNewPrivs"] == "1", pid
        send(daemon.port)
        mail = open_dir / "mail" / "user" / "new"
        delivered = wait_for(lambda: list(mail.glob("*")) if mail.exists() else None, what="Maildir delivery")
    finally:
        assert daemon.stop() == 0
    spool = daemon.spool
    assert (os.stat(spool).st_uid, mode(spool)) == (NOBODY, 0o750)
    for name in ("queue.db", "queue.db-wal", "queue.db-shm", "queue.db-lock"):
        if (spool / name).exists():
            st = os.stat(spool / name)
            assert (st.st_uid, mode(spool / name) & 0o027) == (NOBODY, 0), name
    drop = open_dir / "spool-maildrop"
    assert (os.stat(drop).st_uid, mode(drop)) == (NOBODY, 0o3733)
    for path in (open_dir / "mail" / "user", mail, *delivered):
        assert os.stat(path).st_uid == NOBODY and mode(path) & 0o077 == 0, path


@root_only
def test_a_kept_capability_lets_a_reload_bind_a_low_port(open_dir):
    port = free_low_port()
    daemon = daemon_in(open_dir, CONFIG.replace("@SERVER@", ""), wrap=from_readable_copy).start()
    try:
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(
            text.replace('role = "mx"\n', f'role = "mx"\n\n[[listeners]]\naddress = "127.0.0.1:{port}"\nrole = "mx"\n', 1))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in daemon.log_text(), what="the reload")
        assert "reload_failed" not in daemon.log_text()
        send(port)
    finally:
        daemon.stop()


def free_low_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


@root_only
def test_a_spool_left_by_root_is_given_to_the_user(open_dir):
    spool = open_dir / "spool"
    spool.mkdir(mode=0o755)
    (spool / "queue.db").write_bytes(b"")  # an elemta that ran as root made it
    os.chmod(spool / "queue.db", 0o644)
    daemon = daemon_in(open_dir, CONFIG.replace("@SERVER@", ""), wrap=from_readable_copy).start()
    daemon.stop()
    assert mode(spool) == 0o750
    assert {os.stat(p).st_uid for p in (spool, *spool.iterdir())} == {NOBODY}


@root_only
def test_started_as_the_user_with_the_capability_like_systemd(open_dir):
    """As elemta.service starts it: User= and AmbientCapabilities=CAP_NET_BIND_SERVICE."""
    port = free_low_port()
    for name in ("spool", "spool-maildrop"):
        (open_dir / name).mkdir()
        os.chown(open_dir / name, NOBODY, NOBODY)
    daemon = daemon_in(open_dir, CONFIG.replace("@SERVER@", "").replace("127.0.0.1:0", f"127.0.0.1:{port}"),
                    wrap=lambda cmd: systemd_like(cmd))
    daemon.start()
    try:
        assert status(daemon.proc.pid)["Uid"].split() == [str(NOBODY)] * 4
        send(port)
    finally:
        daemon.stop()
    assert mode(open_dir / "spool") == 0o750


def systemd_like(command: list[str]) -> tuple[list[str], dict[str, str]]:
    args, env = as_nobody(command)
    setpriv = [a for a in args[: args.index("--clear-groups") + 1]]
    rest = args[len(setpriv):]
    return [*setpriv, "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service", *rest], env


@root_only
def test_no_such_user_is_one_line_and_exit_78(open_dir):
    daemon = daemon_in(open_dir, CONFIG.replace('user = "nobody"', 'user = "no-such-user-here"').replace("@SERVER@", ""))
    result = subprocess.run([str(ELEMTA), "--config", str(daemon.config_path)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "elemta: server.user: no such user 'no-such-user-here' (create it: adduser --system --group "
        "no-such-user-here; or set server.user = \"root\" to run as root, not recommended)"]


@root_only
@pytest.mark.parametrize("key_mode, owner, expected", [
    (0o644, 0, r"tls\.certificates\[0\]\.key_file: .*key\.pem: readable or writable by others \(mode 0644\); "
               r"run chmod o-rwx .*key\.pem$"),
    (0o600, 0, r"tls\.certificates\[0\]: .*key\.pem: permission denied \(read as user nobody\)$"),
])
def test_a_key_others_can_read_or_the_user_cannot_stops_the_start(open_dir, key_mode, owner, expected):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("mx.example.test")
    cert.cert_chain_pems[0].write_to_path(str(open_dir / "cert.pem"))
    cert.private_key_pem.write_to_path(str(open_dir / "key.pem"))
    os.chmod(open_dir / "cert.pem", 0o644)
    os.chmod(open_dir / "key.pem", key_mode)
    os.chown(open_dir / "key.pem", owner, owner)
    config = CONFIG.replace("@SERVER@", "") + (
        f'\n[[tls.certificates]]\ncert_file = "{open_dir}/cert.pem"\nkey_file = "{open_dir}/key.pem"\n')
    daemon = daemon_in(open_dir, config)
    command, env = from_readable_copy([str(ELEMTA), "--config", str(daemon.config_path)])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 78, result.stderr
    import re

    assert len(result.stderr.splitlines()) == 1, result.stderr
    [line] = result.stderr.splitlines()

    assert re.match(r"^elemta: " + expected, line), line


def test_target_keeps_the_identity_when_not_root_in_dev_mode_or_told_root():
    assert privileges.target(Config(), euid=1000) is None
    assert privileges.target(Config(dev=True), euid=0) is None
    assert privileges.target(Config(server=ServerConfig(user="root")), euid=0) is None
    with pytest.raises(ConfigError, match="server.user: 'root'|server.user: no such"):
        privileges.target(Config(server=ServerConfig(user="no-such-user-here")), euid=0)
    who = privileges.target(Config(server=ServerConfig(user="nobody")), euid=0)
    assert (who.uid, who.gid) == (NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="server.group: no such group 'no-such-group'"):
        privileges.target(Config(server=ServerConfig(user="nobody", group="no-such-group")), euid=0)


def test_check_secret(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.chmod(secret, 0o640)
    filemodes.check_secret(str(secret), "some.key")
    os.chmod(secret, 0o604)
    with pytest.raises(ConfigError, match=r"^some\.key: .*secret: readable or writable by others \(mode 0604\)"):
        filemodes.check_secret(str(secret), "some.key")
    os.chmod(secret, 0o602)
    with pytest.raises(ConfigError, match="mode 0602"):
        filemodes.check_secret(str(secret), "some.key")
    link = tmp_path / "link"
    link.symlink_to(secret)
    os.chmod(secret, 0o600)
    filemodes.check_secret(str(link), "some.key")  # a symlink is followed (certbot's live/)
    with pytest.raises(ConfigError, match="not a regular file"):
        filemodes.check_secret(str(tmp_path), "some.key")
    with pytest.raises(ConfigError, match=r"missing: No such file or directory \(read as user "):
        filemodes.check_secret(str(tmp_path / "missing"), "some.key")


def test_ensure_dir_modes(tmp_path):
    made = tmp_path / "a" / "spool"
    filemodes.ensure_dir(str(made), 0o750)
    assert mode(made) == 0o750
    os.chmod(made, 0o700)
    filemodes.ensure_dir(str(made), 0o750)
    assert mode(made) == 0o700  # an admin's stricter mode is kept
    os.chmod(made, 0o777)
    filemodes.ensure_dir(str(made), 0o750)
    assert mode(made) == 0o750  # what others were given is taken away
    drop = tmp_path / "drop"
    drop.mkdir(mode=0o700)
    filemodes.ensure_dir(str(drop), 0o3733, exact=True)
    assert mode(drop) == 0o3733
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        filemodes.ensure_dir(str(tmp_path / "file"), 0o750)


@root_only
def test_keys_and_passwords_root_makes_are_read_by_the_unprivileged_daemon(open_dir):
    """elemtactl dkim keygen and user add, run by root, write files the service's group reads
    (0640, group of server.user); the daemon running as that user starts with them and signs."""
    from tests.support import ROOT

    ctl = ROOT / "bin" / "elemtactl"
    keys = open_dir / "dkim"
    passwd = open_dir / "passwd"
    config = CONFIG.replace("@SERVER@", "").replace("[smtp]\n", f'[smtp]\nauth_file = "{passwd}"\n') + f"""
[[plugins]]
use = "dkim"
options = {{ verify = false, keys = [{{ domain = "example.org", selector = "s1", key_file = "{keys}/example.org.s1.key" }}] }}
"""
    daemon = daemon_in(open_dir, config, wrap=from_readable_copy)
    made = subprocess.run([str(ctl), "--config", str(daemon.config_path), "dkim", "keygen", "example.org", "s1",
                           "--algorithm", "ed25519", "--key-dir", str(keys)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    added = subprocess.run([str(ctl), "--config", str(daemon.config_path), "user", "add", "alice@example.org",
                            "--password-stdin"], input="a long enough password\n",
                           capture_output=True, text=True, timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    key = keys / "example.org.s1.key"
    for path, wanted in ((key, 0o640), (keys, 0o750), (passwd, 0o640)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, mode(path)) == (0, NOBODY, wanted), path
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.sendmail("a@example.org", ["user@example.test"], b"From: a@example.org\r\nSubject: t\r\n\r\nhi\r\n")
        [row] = wait_for(daemon.messages, what="the message")
        assert b"DKIM-Signature:" in daemon.body(row["queue_id"])
    finally:
        daemon.stop()
