"""sendmail, mailq and newaliases as local programs run them: an ordinary user (UID 1,
`daemon`) submits through the real launcher to the real daemon (running as nobody), with
every flag cron, PHP, git send-email, mutt and logwatch use; and with the daemon stopped."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support import ROOT, Daemon, from_readable_copy, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to run as other users)")

SENDMAIL = ROOT / "bin" / "elemta-sendmail"
SUBMITTER = 1  # user "daemon" on Debian: an ordinary account that is neither root nor nobody

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
user = "nobody"
hostname = "host.example.test"

[smtp]
max_message_size = 20000

[delivery]
hold = true
"""




@pytest.fixture
def daemon(open_dir):
    daemon = Daemon(open_dir, CONFIG, wrap=from_readable_copy)
    os.chmod(daemon.config_path, 0o644)
    daemon.start()
    yield daemon
    daemon.stop()


def run(daemon: Daemon, args: list[str], data: bytes = b"", *, uid: int = SUBMITTER, name: str = "sendmail"):
    """The launcher, called by `name` (a symlink, as /usr/sbin/sendmail or /usr/bin/mailq)."""
    link = daemon.workdir / "bin" / name
    if not link.exists():
        link.parent.mkdir(exist_ok=True)
        os.chmod(link.parent, 0o755)
        command, _ = from_readable_copy([str(SENDMAIL)])
        link.symlink_to(command[0])
    command, env = from_readable_copy([str(link), "-C", str(daemon.config_path), *args])
    if uid != 0:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    return subprocess.run(command, input=data, capture_output=True, env=env, cwd="/", timeout=60, check=False)


def queued(daemon: Daemon, count: int = 1) -> list:
    return wait_for(lambda: len(daemon.messages()) >= count and daemon.messages(), what=f"{count} queued message(s)")


def header_of(body: bytes) -> bytes:
    return body.split(b"\r\n\r\n", 1)[0]


def test_plain_submission_records_the_submitter_and_completes_the_header(daemon):
    result = run(daemon, ["someone@example.org"], b"Subject: hi\n\nhello\n")
    assert (result.returncode, result.stderr) == (0, b"")
    [row] = queued(daemon)
    body = daemon.body(row["queue_id"])
    head = header_of(body)
    assert re.match(rb"Received: by host\.example\.test \(elemta, from userid 1\)\r\n\tid " + row["queue_id"].encode(), head)
    assert b"\r\nFrom: daemon <daemon@host.example.test>\r\n" in head
    assert b"\r\nDate: " in head and b"\r\nMessage-ID: <" in head
    assert body.endswith(b"\r\nSubject: hi\r\n\r\nhello\r\n")
    assert row["sender"] == "daemon@host.example.test"
    assert [r["address"] for r in daemon.recipients(row["queue_id"])] == ["someone@example.org"]
    line = wait_for(lambda: [x for x in daemon.log_text().splitlines() if " pickup " in x], what="the log line")[0]
    assert f"{row['queue_id']} pickup uid=1 " in line


def test_t_takes_to_cc_bcc_hides_bcc_and_keeps_command_line_recipients(daemon):
    message = (b"From: Cron Daemon <root@host.example.test>\nTo: a@example.org, \"B\" <b@example.org>\n"
               b"Cc: c@example.org\nBcc: hidden@example.org,\n  hidden2@example.org\nSubject: t\n\nbody\n")
    result = run(daemon, ["-t", "-i", "extra@example.org"], message)
    assert result.returncode == 0, result.stderr
    [row] = queued(daemon)
    got = sorted(r["address"] for r in daemon.recipients(row["queue_id"]))
    assert got == ["a@example.org", "b@example.org", "c@example.org", "extra@example.org",
                   "hidden2@example.org", "hidden@example.org"]
    body = daemon.body(row["queue_id"])
    assert b"hidden" not in body and b"Bcc" not in body
    assert b"\r\nFrom: Cron Daemon <root@host.example.test>\r\n" in body  # the message's own From stays


def test_a_lone_dot_ends_the_message_unless_i_or_oi(daemon):
    text = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert run(daemon, ["a@example.org"], text).returncode == 0
    assert run(daemon, ["-oi", "a@example.org"], text).returncode == 0
    assert run(daemon, ["-i", "a@example.org"], text).returncode == 0
    rows = queued(daemon, 3)
    bodies = sorted(daemon.body(r["queue_id"]).split(b"\r\n\r\n", 1)[1] for r in rows)
    assert bodies == [b"before\r\n", b"before\r\n.\r\nafter\r\n", b"before\r\n.\r\nafter\r\n"]


def test_f_F_and_the_dsn_flags(daemon):
    result = run(daemon, ["-f", "bounces@example.net", "-F", "Build Bot", "-N", "failure,delay", "-R", "hdrs",
                          "-V", "env-1", "-odb", "-oem", "-v", "-X", "/dev/null", "-U", "--", "a@example.org"],
                 b"Subject: x\n\nx\n")
    assert result.returncode == 0, result.stderr
    [row] = queued(daemon)
    assert (row["sender"], row["ret"], row["envid"]) == ("bounces@example.net", "HDRS", "env-1")
    [rcpt] = daemon.recipients(row["queue_id"])
    assert rcpt["notify"] in ("FAILURE,DELAY", '["FAILURE", "DELAY"]') or "FAILURE" in rcpt["notify"]
    assert b"\r\nFrom: Build Bot <bounces@example.net>\r\n" in daemon.body(row["queue_id"])
    assert run(daemon, ["-f", "<>", "b@example.org"], b"Subject: null\n\n").returncode == 0
    assert [r["sender"] for r in queued(daemon, 2)].count("") == 1


def test_grouped_flags_as_getopt_reads_them(daemon):
    assert run(daemon, ["-ti"], b"To: a@example.org\nSubject: g\n\n.\nkept\n").returncode == 0
    [row] = queued(daemon)
    assert daemon.body(row["queue_id"]).endswith(b"\r\n.\r\nkept\r\n")
    refused = run(daemon, ["-tq", "a@example.org"], b"x\n")
    assert refused.returncode == 64 and b"unknown option -q in -tq" in refused.stderr


def test_a_bare_name_gets_the_host_name(daemon):
    assert run(daemon, ["root"], b"Subject: cron\n\n").returncode == 0
    [row] = queued(daemon)
    assert [r["address"] for r in daemon.recipients(row["queue_id"])] == ["root@host.example.test"]


def test_bs_speaks_smtp_on_stdin_and_stdout(daemon):
    dialogue = (b"EHLO client\r\nMAIL FROM:<me@example.org>\r\nRCPT TO:<you@example.org>\r\nDATA\r\n"
                b"Subject: bs\r\n\r\nvia -bs\r\n.\r\nQUIT\r\n")
    result = run(daemon, ["-bs"], dialogue)
    assert result.returncode == 0
    replies = result.stdout.decode().splitlines()
    assert replies[0].startswith("220 host.example.test ")
    assert replies[-2].startswith("250 2.0.0 Ok: queued as ") and replies[-1].startswith("221 ")
    [row] = queued(daemon)
    body = daemon.body(row["queue_id"])
    assert body.count(b"Received:") == 1 and b"from userid 1" in body  # not the session's 127.0.0.1
    assert row["sender"] == "me@example.org"


def test_mailq_and_bp_list_the_queue_for_root_only(daemon):
    run(daemon, ["a@example.org"], b"Subject: q\n\n")
    [row] = queued(daemon)
    for name, args in (("mailq", []), ("sendmail", ["-bp"])):
        result = run(daemon, args, uid=0, name=name)
        assert result.returncode == 0, result.stderr
        assert row["queue_id"] in result.stdout.decode()
    refused = run(daemon, [], name="mailq")
    assert refused.returncode == 77
    assert b"permission denied" in refused.stderr


def test_q_flushes_the_queue(daemon):
    result = run(daemon, ["-q"], uid=0)
    assert result.returncode == 0, result.stderr
    assert b"flushed" in result.stdout


def test_newaliases_reloads_the_daemon(daemon):
    result = run(daemon, [], uid=0, name="newaliases")
    assert result.returncode == 0, result.stderr
    assert b"reloads its aliases" in result.stderr
    wait_for(lambda: "reloaded" in daemon.log_text(), what="the reload")
    assert run(daemon, ["-bi"], uid=SUBMITTER).returncode == 77


@pytest.mark.parametrize("args, data, code, message", [
    (["-Z"], b"", 64, b"unknown option -Z"),
    ([], b"Subject: x\n\n", 64, b"no recipients given"),
    (["-t"], b"Subject: x\n\n", 65, b"no recipients: the message has no To, Cc or Bcc address"),
    (["bad address@@example.org"], b"x\n", 64, b"recipient"),
    (["-f", "a@@b", "x@example.org"], b"x\n", 64, b"sender (-f)"),
    (["-N", "sometimes", "x@example.org"], b"x\n", 64, b"-N sometimes"),
    (["-bd"], b"", 64, b"run the daemon as elemta"),
    (["x@example.org"], b"Subject: fits\n\n" + (b"y" * 900 + b"\n") * 20, 0, b""),
    (["x@example.org"], b"Subject: big\n\n" + (b"y" * 900 + b"\n") * 30, 65, b"larger than smtp.max_message_size"),
])
def test_errors_use_sysexits_and_store_nothing(daemon, args, data, code, message):
    result = run(daemon, args, data)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    if code:
        assert result.stderr.startswith(b"sendmail: ")
        assert daemon.messages() == [] and not list((daemon.workdir / "spool-maildrop").iterdir())


def test_mail_given_while_the_daemon_is_stopped_waits_for_its_start(daemon):
    daemon.stop()
    result = run(daemon, ["later@example.org"], b"Subject: later\n\nwhile stopped\n")
    assert result.returncode == 0, result.stderr
    waiting = list((daemon.workdir / "spool-maildrop").iterdir())
    assert len(waiting) == 1 and waiting[0].stat().st_uid == SUBMITTER
    assert daemon.messages() == []
    listing = run(daemon, ["-bp"], uid=0)
    assert b"1 message(s) in the maildrop" in listing.stderr
    daemon.start()
    [row] = queued(daemon)
    assert daemon.body(row["queue_id"]).endswith(b"while stopped\r\n")
    wait_for(lambda: not list((daemon.workdir / "spool-maildrop").iterdir()), what="the maildrop emptied")


def test_the_maildrop_file_is_the_submitters_and_no_one_else_can_find_it(daemon):
    daemon.stop()
    run(daemon, ["a@example.org"], b"Subject: private\n\n")
    drop = daemon.workdir / "spool-maildrop"
    [path] = drop.iterdir()
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (SUBMITTER, 65534, 0o740)  # group: the service's
    lister = subprocess.run(["setpriv", "--reuid=2", "--regid=2", "--clear-groups", "ls", str(drop)],
                            capture_output=True, timeout=30, check=False)
    assert lister.returncode != 0  # others cannot list the maildrop
