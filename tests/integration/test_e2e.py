"""End to end: the real launcher as a subprocess, real clients (smtplib, swaks), the queue read
back from SQLite and compared byte for byte."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile

import pytest

from tests.support import ELEMTA, Daemon, RawClient, as_nobody, as_root, wait_for

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.e2e.example"
grace_period = {grace}

[smtp]
local_domains = ["example.com"]
max_message_size = {size}

[queue]
min_free_space = {free}
max_messages = {max_messages}

# These tests are about intake: keep the mail in the queue.
[delivery]
hold = true
"""


def config(grace=30, size=1_000_000, free=0, max_messages=0) -> str:
    return CONFIG.format(grace=grace, size=size, free=free, max_messages=max_messages)


@pytest.fixture
def daemon(tmp_path):
    started = Daemon(tmp_path, config()).start()
    yield started
    started.stop()


def stored_text(daemon: Daemon, qid: str) -> bytes:
    """The stored message without the Received header elemta prepended."""
    body = daemon.body(qid)
    assert body.startswith(b"Received: from ")
    return body[body.index(b"\r\n", body.index(b";\r\n\t") + 3) + 2 :]


def test_smtplib_message_stored_byte_for_byte(daemon):
    text = (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: e2e\r\n"
        b"Message-ID: <e2e@example.org>\r\n\r\nHello Bob.\r\n.leading dot\r\n\r\nBye.\r\n"
    )
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.example")
        refused = client.sendmail("alice@example.org", ["bob@example.com", "carol@example.com"], text)
    assert refused == {}
    [message] = daemon.messages()
    qid = message["queue_id"]
    assert message["sender"] == "alice@example.org"
    assert stored_text(daemon, qid) == text
    rcpts = daemon.recipients(qid)
    assert [(r["address"], r["state"]) for r in rcpts] == [
        ("bob@example.com", "held"), ("carol@example.com", "held"),
    ]
    wait_for(lambda: f"{qid} queued size=" in daemon.log_text(), 5, what="the queued log line")
    assert f"{qid} mail " in daemon.log_text() and f"{qid} rcpt " in daemon.log_text()


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_message(daemon):
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{daemon.port}", "--from", "s@example.org",
         "--to", "user@example.com", "--header", "Subject: swaks test", "--body", "from swaks",
         "--pipeline"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued as" in result.stdout
    [message] = daemon.messages()
    stored = stored_text(daemon, message["queue_id"])
    assert b"Subject: swaks test\r\n" in stored and b"from swaks" in stored


def test_dev_mode_holds_mail_and_says_its_port(tmp_path):
    proc = subprocess.Popen(
        [str(ELEMTA), "--dev", "--port", "0"], cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout.readline().startswith("elemta: dev mode: spool ")
        line = proc.stdout.readline()
        assert line.startswith("elemta: listening on 127.0.0.1:"), line
        port = int(line.split(":")[2].split()[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("dev@example.org", ["anyone@anywhere.example"], b"Subject: dev\r\n\r\nx\r\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "dev-spool" / "queue.db").exists()
    dev = Daemon(tmp_path, "")
    dev.spool = tmp_path / "dev-spool"
    [message] = dev.messages()
    assert [r["state"] for r in dev.recipients(message["queue_id"])] == ["held"]


def test_intake_refused_when_disk_space_is_low(tmp_path):
    daemon = Daemon(tmp_path, config(free=2**50)).start()
    try:
        with RawClient("127.0.0.1", daemon.port) as c:
            assert c.cmd("EHLO c.example")[0] == 250
            code, text = c.cmd("MAIL FROM:<a@example.org>")
            assert (code, text.split()[0]) == (452, "4.3.1")
    finally:
        assert daemon.stop() == 0


def test_intake_refused_over_queue_quota(tmp_path):
    daemon = Daemon(tmp_path, config(max_messages=1)).start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.sendmail("a@example.org", ["u@example.com"], b"Subject: 1\r\n\r\nx\r\n")
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("a@example.org", ["u@example.com"], b"Subject: 2\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 452
        assert len(daemon.messages()) == 1
    finally:
        assert daemon.stop() == 0


def test_sighup_reloads_limits_and_listeners(tmp_path):
    daemon = Daemon(tmp_path, config(size=1_000_000)).start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.ehlo("c.example")
            assert client.esmtp_features["size"] == "1000000"
        daemon.config_path.write_text(
            daemon.config_path.read_text().replace("1000000", "50000")
            + '\n[[listeners]]\naddress = "127.0.0.1:0"\nrole = "submission"\n'
        )
        # The new file lists 127.0.0.1:0 twice, which the config check refuses: the reload
        # fails and the old config keeps running.
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in daemon.log_text(), 10, what="reload_failed")
        daemon.config_path.write_text(config(size=50_000))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "NOQUEUE reloaded" in daemon.log_text(), 10, what="reloaded")
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.ehlo("c.example")
            assert client.esmtp_features["size"] == "50000"
    finally:
        assert daemon.stop() == 0


def test_sigterm_lets_an_open_transaction_finish(tmp_path):
    daemon = Daemon(tmp_path, config(grace=30)).start()
    with RawClient("127.0.0.1", daemon.port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        daemon.signal(signal.SIGTERM)
        wait_for(lambda: "NOQUEUE stopping" in daemon.log_text(), 10, what="stopping")
        # The listener is closed: new clients are refused...
        with pytest.raises(OSError):
            RawClient("127.0.0.1", daemon.port, timeout=2)
        # ...but the open session completes its message.
        assert c.cmd("RCPT TO:<u@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        code, text = c.cmd(b"Subject: late\r\n\r\nstill here\r\n.\r\n")
        assert code == 250 and "queued as" in text
        assert c.cmd("QUIT")[0] == 221
    assert daemon.proc.wait(30) == 0
    assert len(daemon.messages()) == 1


def test_sigterm_grace_over_tells_idle_clients_421(tmp_path):
    daemon = Daemon(tmp_path, config(grace=0.5)).start()
    with RawClient("127.0.0.1", daemon.port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        daemon.signal(signal.SIGTERM)
        code, text = c.reply()
        assert (code, text.split()[0]) == (421, "4.3.2")
    assert daemon.proc.wait(30) == 0


def test_check_config_of_the_example_file():
    # Not as root: root's check also asks that server.user ("elemta") exists, which it need not
    # on a test machine (tests/test_privileges.py checks that message).
    with tempfile.TemporaryDirectory(dir="/tmp") as readable:
        os.chmod(readable, 0o755)
        conf = shutil.copy(ELEMTA.parent.parent / "conf" / "elemta.toml", readable)
        os.chmod(conf, 0o644)
        command, env = (as_nobody if os.geteuid() == 0 else lambda c: (c, dict(os.environ)))(
            [sys.executable, "-m", "elemta", "--check-config", "--config", conf])
        result = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("table", "line", "expected"), [
    ("local", 'recipients_file = "@DIR@/missing"', r"^elemta: local\.recipients_file: .*missing: No such file"),
    ("delivery", 'relayhost = "127.0.0.1:2525"\nrelayhost_auth_file = "@DIR@/missing"',
     r"^elemta: delivery\.relayhost_auth_file: .*missing: No such file"),
    ("delivery", 'resolvers = ["127.0.0.1:5353", "127.0.0.1:5354"]',
     r"^elemta: delivery\.resolvers: nameserver 127\.0\.0\.1 given with two ports"),
])
def test_check_config_reads_the_files_start_up_reads(tmp_path, table, line, expected):
    conf = tmp_path / "elemta.toml"
    conf.write_text(as_root(f"[{table}]\n{line.replace('@DIR@', str(tmp_path))}\n"))
    result = subprocess.run([str(ELEMTA), "--check-config", "--config", str(conf)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 78
    assert re.match(expected, result.stderr) and result.stderr.count("\n") == 1, result.stderr


def test_check_config_and_the_start_refuse_a_missing_certificate(tmp_path):
    """Defect 7 of issue 16: --check-config said "valid" and the start then exited 78."""
    conf = tmp_path / "elemta.toml"
    conf.write_text(as_root(f'[server]\nspool_dir = "{tmp_path}/spool"\n'
                            f'[[tls.certificates]]\ncert_file = "{tmp_path}/missing.pem"\n'))
    expected = f"elemta: tls.certificates[0]: {tmp_path}/missing.pem: no such file\n"
    for args in (["--check-config"], []):
        result = subprocess.run([str(ELEMTA), *args, "--config", str(conf)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert (result.returncode, result.stderr, result.stdout) == (78, expected, ""), args


def test_the_start_reports_every_problem_of_the_file(tmp_path):
    conf = tmp_path / "elemta.toml"
    conf.write_text('[[listeners]]\naddress = "127.0.0.1:0"\nrole = "relay"\n'
                    '[server]\nworkers = 0\nuserr = "x"\n')
    result = subprocess.run([str(ELEMTA), "--config", str(conf)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert [line.split(":")[:2] for line in lines] == [
        ["elemta", " listeners[0].role"], ["elemta", " server.workers"], ["elemta", " server.userr"]], lines


def test_unusable_spool_is_one_line_and_exit_73(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool should be")
    daemon = Daemon(tmp_path, config().replace('"@SPOOL@"', f'"{blocker}/spool"'))
    result = subprocess.run(
        [str(ELEMTA), "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 73
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"elemta: server.spool_dir: cannot create {blocker}")


def test_reload_that_cannot_bind_changes_nothing(tmp_path):
    import socket

    daemon = Daemon(tmp_path, config(size=1_000_000)).start()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        daemon.config_path.write_text(
            config(size=50_000)
            + f'\n[[listeners]]\naddress = "127.0.0.1:{busy.getsockname()[1]}"\nrole = "submission"\n'
        )
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in daemon.log_text(), 10, what="reload_failed")
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.ehlo("c.example")
            assert client.esmtp_features["size"] == "1000000"  # the old limits still apply
    finally:
        busy.close()
        assert daemon.stop() == 0


def test_two_workers_share_the_port_and_the_queue(tmp_path):
    from tests.queue.idparts import id_worker

    daemon = Daemon(tmp_path, config().replace("[server]", "[server]\nworkers = 2")).start()
    try:
        assert len(daemon.addresses) == 1  # one port, announced once by the supervisor
        wait_for(lambda: daemon.log_text().count("NOQUEUE started") == 2, 10, what="two workers")
        for n in range(24):  # new connections: the kernel spreads them over both workers
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
                client.sendmail("a@example.org", ["u@example.com"], b"Subject: %d\r\n\r\nx\r\n" % n)
        stored = [row["queue_id"] for row in daemon.messages()]
        assert len(stored) == 24 and len(set(stored)) == 24
        assert {id_worker(queue_id) for queue_id in stored} == {0, 1}
        daemon.signal(signal.SIGHUP)
        # Both workers and the delivery process.
        wait_for(lambda: daemon.log_text().count("NOQUEUE reloaded") == 3, 10, what="all reloaded")
    finally:
        assert daemon.stop() == 0
    assert "NOQUEUE stopped" in daemon.log_text()


def test_workers_start_together_on_a_fresh_spool(tmp_path):
    """Several workers opening a spool that does not exist yet must not race to create it
    (bench/accept.py once saw 'database is locked' there)."""
    for attempt in range(3):
        daemon = Daemon(tmp_path / str(attempt), config().replace("[server]", "[server]\nworkers = 4"))
        try:
            daemon.start()
            wait_for(lambda d=daemon: d.log_text().count("NOQUEUE started") == 4, 10, what="4 workers")
        finally:
            assert daemon.stop() == 0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie serves nothing
    except FileNotFoundError:
        return True


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    import re

    daemon = Daemon(tmp_path, config().replace("[server]", "[server]\nworkers = 2")).start()
    try:
        line = wait_for(
            lambda: re.search(r"supervising workers=2 pids=(\d+),(\d+) delivery=(\d+)", daemon.log_text()), 10,
            what="the supervising line",
        )
        workers = [int(pid) for pid in line.groups()]  # the delivery process too
        assert not any(_gone(pid) for pid in workers)
    finally:
        daemon.kill()  # SIGKILL: the supervisor cannot pass anything on
    wait_for(lambda: all(_gone(pid) for pid in workers), 30, what="the workers to stop")
