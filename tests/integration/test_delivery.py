"""End to end: mail sent to the real daemon leaves it for a loopback MX found through loopback DNS.

The remote MX is aiosmtpd (tests/mx.py), DNS is a dnslib server (tests/dnsserver.py), the
daemon is bin/elemta started as a subprocess; retries run on a test schedule of about a
second, waited for by condition.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import smtplib
import sqlite3
import ssl

import pytest
from aiosmtpd.smtp import AuthResult

from tests.dnsserver import DnsServer
from tests.mx import Mx
from tests.support import Daemon, wait_for

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "relay.test"
grace_period = 5
{server_extra}

[smtp]
local_domains = ["local.test"]

[queue]
min_free_space = 0

[delivery]
resolvers = ["{dns}"]
mx_port = {mx_port}
dns_timeout = 2
retry_first = 1
retry_max = 1
retry_jitter = 0
max_lifetime = {lifetime}
delay_warning = {delay_warning}
destination_concurrency = {dest_conc}
{delivery_extra}

[local]
transport = "lmtp:127.0.0.1:{lmtp_port}"
recipients = ["alice@local.test"]
aliases = {{ "team@local.test" = "alice@local.test, carol@remote.test"{aliases_extra} }}
{local_extra}
"""

ZONE = {
    "remote.test": [("MX", (10, "mx.remote.test"), 300)],
    "mx.remote.test": [("A", "127.0.0.1", 300)],
    "sender.test": [("MX", (10, "mx.remote.test"), 300)],
    # The first MX has nothing listening (127.0.0.2 is loopback too): the second must be used.
    "backup.test": [("MX", (10, "down.backup.test"), 300), ("MX", (20, "mx.remote.test"), 300)],
    "down.backup.test": [("A", "127.0.0.2", 300)],
    "nullmx.test": [("MX", (0, "."), 300)],
}


@pytest.fixture
def dns():
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture
def mx():
    with Mx() as server:
        yield server


@pytest.fixture
def lmtp():
    with Mx(lmtp=True) as server:
        yield server


@pytest.fixture
def start(tmp_path, dns, mx, lmtp):
    daemons = []

    def run(lifetime=3600, dest_conc=10, delivery_extra="", workdir=None, mx_port=None, delay_warning=0,
            server_extra="", aliases_extra="", local_extra="") -> Daemon:
        text = CONFIG.format(dns=dns.nameserver, mx_port=mx_port or mx.port, lmtp_port=lmtp.port, lifetime=lifetime,
                             delay_warning=delay_warning, server_extra=server_extra,
                             dest_conc=dest_conc, delivery_extra=delivery_extra,
                             aliases_extra=aliases_extra, local_extra=local_extra)
        daemon = Daemon(workdir or tmp_path, text).start()
        daemons.append(daemon)
        return daemon

    yield run
    for daemon in daemons:
        daemon.stop()


def send(daemon: Daemon, rcpts, body: bytes = b"Subject: test\r\n\r\nHello.\r\n", sender="alice@sender.test",
         **kwargs) -> str:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.docmd("MAIL", f"FROM:<{sender}>" + kwargs.get("mail_params", ""))
        assert code == 250, text
        for rcpt in [rcpts] if isinstance(rcpts, str) else rcpts:
            code, text = client.docmd("RCPT", f"TO:<{rcpt}>" + kwargs.get("rcpt_params", ""))
            assert code == 250, text
        code, text = client.data(body)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def states(daemon: Daemon, qid: str) -> dict[str, str]:
    return {r["address"]: r["state"] for r in daemon.recipients(qid)}


def attempts(daemon: Daemon, qid: str) -> list[sqlite3.Row]:
    with daemon.db() as conn:
        return conn.execute("SELECT * FROM attempts WHERE queue_id = ? ORDER BY id", (qid,)).fetchall()


def bounce_for(mx: Mx, sender: str = "alice@sender.test", timeout: float = 15) -> email.message.EmailMessage:
    wait_for(lambda: mx.handler.to(sender), timeout, what=f"a report to {sender}")
    got = mx.handler.to(sender)[0]
    assert got.mail_from == "<>"
    return email.message_from_bytes(got.data, policy=email.policy.default)


def report_fields(report: email.message.EmailMessage) -> list:
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()  # [per-message fields, per-recipient fields...]


def test_delivered_to_the_mx_with_the_exact_bytes(start, mx):
    daemon = start()
    body = b"Subject: exact\r\nX-Test: 1\r\n\r\n.leading dot\r\nline two\r\n"
    qid = send(daemon, "bob@remote.test", body)
    wait_for(lambda: mx.handler.to("bob@remote.test"), 10, what="delivery")
    got = mx.handler.to("bob@remote.test")[0]
    assert got.mail_from == "alice@sender.test"
    stored_prefix = b"Received: "
    assert got.data.startswith(stored_prefix) and got.data.endswith(body)
    wait_for(lambda: states(daemon, qid) == {"bob@remote.test": "delivered"}, 5, what="delivered state")
    (attempt,) = attempts(daemon, qid)
    assert attempt["outcome"] == "delivered" and attempt["host"] == "mx.remote.test"
    assert attempt["ip"] == "127.0.0.1" and attempt["port"] == mx.port
    assert attempt["reply"].startswith("250") and attempt["duration"] >= 0
    with daemon.db() as conn:
        assert conn.execute("SELECT count(*) FROM bodies WHERE queue_id = ?", (qid,)).fetchone()[0] == 0


def test_temporary_failure_is_retried_on_schedule(start, mx):
    mx.handler.script("slow@remote.test", "451 4.3.0 try again later")
    daemon = start()
    qid = send(daemon, "slow@remote.test")
    wait_for(lambda: mx.handler.to("slow@remote.test"), 15, what="delivery on retry")
    wait_for(lambda: len(attempts(daemon, qid)) == 2, 5, what="two attempts recorded")
    first, second = attempts(daemon, qid)
    assert first["outcome"] == "deferred" and "451 4.3.0 try again later" in first["reply"]
    assert second["outcome"] == "delivered"
    # retry_first = 1 s with no jitter: the retry did not come early.
    assert second["at"] - first["at"] >= 1.0
    wait_for(lambda: states(daemon, qid) == {"slow@remote.test": "delivered"}, 5, what="delivered")


def test_permanent_failure_bounces_once_with_the_remote_text(start, mx):
    mx.handler.script("nobody@remote.test", "550 5.1.1 <nobody@remote.test>: user unknown here")
    daemon = start()
    qid = send(daemon, ["nobody@remote.test", "bob@remote.test"])
    report = bounce_for(mx)
    fields = report_fields(report)
    (rcpt,) = fields[1:]
    assert rcpt["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1"
    assert "user unknown here" in rcpt["Diagnostic-Code"]
    assert rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert report["To"] == "alice@sender.test" and "MAILER-DAEMON@relay.test" in report["From"]
    assert qid in report.get_payload()[0].get_content()
    wait_for(lambda: states(daemon, qid) == {"nobody@remote.test": "failed", "bob@remote.test": "delivered"},
             5, what="final states")
    assert len(mx.handler.to("alice@sender.test")) == 1


def test_first_mx_refuses_so_the_second_is_used(start, mx):
    daemon = start()
    qid = send(daemon, "bob@backup.test")
    wait_for(lambda: mx.handler.to("bob@backup.test"), 15, what="delivery via the second MX")
    wait_for(lambda: states(daemon, qid) == {"bob@backup.test": "delivered"}, 5, what="delivered state")
    hosts = [(a["host"], a["outcome"]) for a in attempts(daemon, qid)]
    assert hosts == [("down.backup.test", "deferred"), ("mx.remote.test", "delivered")]


@pytest.mark.parametrize(("rcpt", "status"), [("x@nxdomain.test", "5.1.2"), ("x@nullmx.test", "5.1.10")])
def test_dns_says_no_such_destination(start, mx, rcpt, status):
    daemon = start()
    qid = send(daemon, rcpt)
    (fields,) = report_fields(bounce_for(mx))[1:]
    assert fields["Status"] == status and fields["Action"] == "failed"
    wait_for(lambda: states(daemon, qid) == {rcpt: "failed"}, 5, what="failed state")


def test_mail_expires_after_its_lifetime_and_bounces(start, mx):
    mx.handler.script("late@remote.test", *["451 4.4.1 not now"] * 50)
    daemon = start(lifetime=2)
    qid = send(daemon, "late@remote.test")
    (fields,) = report_fields(bounce_for(mx))[1:]
    assert fields["Status"] == "4.4.7" and fields["Action"] == "failed"
    assert "not now" in fields["Diagnostic-Code"]
    assert states(daemon, qid) == {"late@remote.test": "failed"}
    assert len(attempts(daemon, qid)) >= 2


def test_unknown_local_user_refused_at_rcpt_and_alias_delivered_over_lmtp(start, mx, lmtp):
    daemon = start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("someone@sender.test")
        code, text = client.rcpt("mallory@local.test")
        assert (code, text[:5]) == (550, b"5.1.1")
    qid = send(daemon, "team@local.test")
    wait_for(lambda: lmtp.handler.to("alice@local.test"), 10, what="LMTP delivery to alice")
    wait_for(lambda: mx.handler.to("carol@remote.test"), 10, what="SMTP delivery to carol")
    wait_for(lambda: set(states(daemon, qid).values()) == {"delivered"}, 5, what="all delivered")
    rows = {r["address"]: r for r in daemon.recipients(qid)}
    assert rows["alice@local.test"]["orcpt"] == "rfc822;team@local.test"
    assert "expanded to" in rows["team@local.test"]["last_error"]


def test_one_connection_carries_twenty_messages(start, mx):
    daemon = start(dest_conc=1)
    qids = [send(daemon, f"user{i}@remote.test") for i in range(20)]
    wait_for(lambda: len(mx.handler.received()) == 20, 20, what="20 deliveries")
    assert mx.handler.connections() == 1
    wait_for(lambda: all(states(daemon, q) == {f"user{i}@remote.test": "delivered"} for i, q in enumerate(qids)),
             5, what="all delivered")


def test_kill_9_during_deliveries_loses_nothing(start, tmp_path, mx):
    daemon = start()
    qids = [send(daemon, f"k{i}@remote.test") for i in range(40)]
    wait_for(lambda: mx.handler.received(), 10, what="deliveries to begin")
    daemon.kill()
    daemon = start(workdir=tmp_path)
    wait_for(lambda: all(set(states(daemon, q).values()) == {"delivered"} for q in qids), 30,
             what="every message delivered after the restart")
    got = {rcpt for m in mx.handler.received() for rcpt in m.rcpt_tos}
    assert got == {f"k{i}@remote.test" for i in range(40)}


def test_sigterm_finishes_the_running_delivery_and_gives_back_the_waiting_ones(start, mx):
    # One connection at a time to a remote that takes a second over each message: when
    # SIGTERM comes, one delivery is running and the others wait for its slot.
    mx.handler.data_delay = 1.0
    daemon = start(dest_conc=1)
    qids = [send(daemon, f"w{i}@remote.test") for i in range(4)]
    wait_for(lambda: mx.handler.data_started, 10, what="the first delivery to reach DATA")
    assert daemon.stop() == 0
    final = [states(daemon, q)[f"w{i}@remote.test"] for i, q in enumerate(qids)]
    assert "active" not in final  # nothing left leased: the waiting ones went back to the queue
    assert final.count("delivered") == len(mx.handler.received()) >= 1
    assert "queued" in final


def test_a_killed_delivery_process_is_restarted_and_retries_what_it_held(start, mx):
    mx.handler.data_delay = 1.0
    daemon = start()
    line = wait_for(lambda: re.search(r"supervising .* delivery=(\d+)", daemon.log_text()), 10,
                    what="the supervising line")
    qid = send(daemon, "crash@remote.test")
    wait_for(lambda: mx.handler.data_started, 10, what="the first delivery to reach DATA")
    os.kill(int(line.group(1)), signal.SIGKILL)  # mid-DATA: the recipient stays leased
    wait_for(lambda: "worker_died" in daemon.log_text(), 10, what="the supervisor to notice")
    wait_for(lambda: states(daemon, qid) == {"crash@remote.test": "delivered"}, 15,
             what="delivery by the restarted process")
    assert daemon.log_text().count("delivery_started") == 2


def test_one_process_receives_and_delivers_without_a_supervisor(start, mx):
    daemon = start(server_extra="delivery_process = false\nworkers = 1")
    qid = send(daemon, "single@remote.test")
    wait_for(lambda: states(daemon, qid) == {"single@remote.test": "delivered"}, 10, what="delivered state")
    assert "supervising" not in daemon.log_text() and "delivery_started" not in daemon.log_text()


# ---- delivery status notifications --------------------------------------------------------


def test_one_mailbox_reached_several_ways_gets_one_copy(start, mx, lmtp):
    """Issue 16, defect 9: postmaster@, abuse@ and Postmaster@LOCAL.test all lead to alice, and
    alice is also given at RCPT three times in other cases: she gets one copy; each recipient
    is delivered and reported (NOTIFY=SUCCESS) once, with the address the sender used."""
    daemon = start(aliases_extra=', "abuse@local.test" = "alice@local.test"',
                   local_extra='postmaster = "alice@local.test"')
    used = ["postmaster@local.test", "abuse@local.test", "Postmaster@LOCAL.test", "alice@local.test",
            "alice@LOCAL.TEST", "Alice@Local.Test"]
    qid = send(daemon, used, rcpt_params=" NOTIFY=SUCCESS")
    def done():
        with daemon.db() as conn:
            return conn.execute("SELECT done_at FROM messages WHERE queue_id = ?", (qid,)).fetchone()[0]

    wait_for(lambda: done() is not None, 15, what="the message done")
    assert {r["state"] for r in daemon.recipients(qid)} == {"delivered"}
    copies = [m for m in lmtp.handler.received() if any(t.lower() == "alice@local.test" for t in m.rcpt_tos)]
    assert len(copies) == 1 and len(copies[0].rcpt_tos) == 1, [m.rcpt_tos for m in copies]
    outcomes = [a["outcome"] for a in attempts(daemon, qid)]
    finals = [r for r in daemon.recipients(qid) if not r["last_error"].startswith("expanded to")]
    # Intake already keeps alice@LOCAL.TEST as alice@local.test, once; Alice@Local.Test is a
    # recipient of its own (local parts keep their case) for the same mailbox.
    assert len(finals) == 5, [r["address"] for r in finals]
    assert sorted(outcomes) == ["delivered"] + ["duplicate"] * 4 + ["expanded"] * 3, outcomes
    wait_for(lambda: len(mx.handler.to("alice@sender.test")) >= 1, 15, what="the success reports")
    reported = []
    for got in mx.handler.to("alice@sender.test"):
        report = email.message_from_bytes(got.data, policy=email.policy.default)
        for rcpt in report_fields(report)[1:]:
            assert rcpt["Action"] == "delivered", rcpt
            reported.append(str(rcpt.get("Original-Recipient") or rcpt["Final-Recipient"]).split(";")[1].strip())
    assert len(reported) == 5 and {a.lower() for a in reported} == {
        "postmaster@local.test", "abuse@local.test", "alice@local.test"}, reported


def no_report_queued(daemon: Daemon) -> bool:
    with daemon.db() as conn:
        return conn.execute("SELECT count(*) FROM messages WHERE sender = ''").fetchone()[0] == 0


def test_notify_never_means_no_bounce(start, mx):
    mx.handler.script("gone@remote.test", "550 5.1.1 no such user")
    daemon = start()
    qid = send(daemon, "gone@remote.test", rcpt_params=" NOTIFY=NEVER")
    wait_for(lambda: states(daemon, qid) == {"gone@remote.test": "failed"}, 10, what="failed state")
    # The report would have been queued in the same transaction as the failure.
    assert no_report_queued(daemon)


def test_ret_full_envid_and_orcpt_come_back_in_the_bounce(start, mx):
    mx.handler.script("gone@remote.test", "550 5.1.1 no such user")
    daemon = start()
    body = b"Subject: keep me\r\n\r\nThe whole message.\r\n"
    send(daemon, "gone@remote.test", body, mail_params=" RET=FULL ENVID=env+2Dtest",
         rcpt_params=" ORCPT=rfc822;orig@remote.test")
    report = bounce_for(mx)
    per_message, rcpt = report_fields(report)
    assert per_message["Original-Envelope-Id"] == "env-test"
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert rcpt["Original-Recipient"].replace(" ", "") == "rfc822;orig@remote.test"
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    (original,) = returned.get_payload()
    assert original["Subject"] == "keep me" and original.get_content() == "The whole message.\r\n"


def test_notify_success_to_a_remote_without_dsn_gives_a_relayed_report(start, mx):
    daemon = start()
    send(daemon, "bob@remote.test", rcpt_params=" NOTIFY=SUCCESS")
    (rcpt,) = report_fields(bounce_for(mx))[1:]
    assert rcpt["Action"] == "relayed" and rcpt["Status"].startswith("2.")


def test_delay_warning_is_sent_once(start, mx):
    mx.handler.script("late@remote.test", "451 4.4.1 not now", "451 4.4.1 not now", "451 4.4.1 not now")
    daemon = start(delay_warning=0.5)
    qid = send(daemon, "late@remote.test")
    (rcpt,) = report_fields(bounce_for(mx))[1:]
    assert rcpt["Action"] == "delayed" and "Will-Retry-Until" in rcpt
    wait_for(lambda: mx.handler.to("late@remote.test"), 15, what="the delivery after the retries")
    # The remote has the message before the daemon records the 250: wait for the state.
    wait_for(lambda: states(daemon, qid) == {"late@remote.test": "delivered"}, 5, what="delivered state")
    assert len(mx.handler.to("alice@sender.test")) == 1


def test_a_bounce_is_never_bounced_but_can_go_to_postmaster(start, mx):
    mx.handler.script("gone@remote.test", "550 5.1.1 no such user", "550 5.1.1 no such user")
    daemon = start()
    qid = send(daemon, "gone@remote.test", sender="")
    wait_for(lambda: states(daemon, qid) == {"gone@remote.test": "failed"}, 10, what="failed state")
    assert len(daemon.messages()) == 1  # only the bounce itself: no report about it
    wait_for(lambda: "double_bounce" in daemon.log_text(), 5, what="the double_bounce log line")
    daemon.stop()
    daemon = start(delivery_extra='double_bounce_to = "postmaster@remote.test"')
    send(daemon, "gone@remote.test", sender="")
    report = bounce_for(mx, "postmaster@remote.test")
    assert report_fields(report)[1]["Action"] == "failed"


# ---- TLS and the relayhost ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


def tls_mx(ca, name: str, **kwargs) -> Mx:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return Mx(tls_context=context, **kwargs)


def verify_remote_test(ca, tmp_path) -> str:
    """[delivery] lines: verify remote.test's MX against the test CA."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return f'tls_policies = {{ "remote.test" = "verify" }}\nca_file = "{tmp_path / "ca.pem"}"'


def test_starttls_with_verify_against_the_mx_name(start, ca, tmp_path):
    extra = verify_remote_test(ca, tmp_path)
    with tls_mx(ca, "mx.remote.test") as good:
        daemon = start(delivery_extra=extra, mx_port=good.port)
        qid = send(daemon, "bob@remote.test")
        wait_for(lambda: good.handler.to("bob@remote.test"), 10, what="delivery over TLS")
        wait_for(lambda: attempts(daemon, qid), 5, what="the attempt record")
        assert attempts(daemon, qid)[0]["tls"].startswith("TLSv1.")


def test_verify_fails_on_a_certificate_for_another_name(start, ca, tmp_path):
    extra = verify_remote_test(ca, tmp_path)
    with tls_mx(ca, "other.example") as wrong:
        daemon = start(delivery_extra=extra, mx_port=wrong.port)
        qid = send(daemon, "bob@remote.test")
        wait_for(lambda: attempts(daemon, qid), 10, what="a failed attempt")
        first = attempts(daemon, qid)[0]
        assert first["outcome"] == "deferred" and "certificate" in first["reply"].lower()
        assert not wrong.handler.received()


def test_relayhost_with_auth_over_starttls(start, ca, tmp_path):
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((mechanism, auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret")

    (tmp_path / "relay-auth").write_text("relayuser:s3cret\n")
    with tls_mx(ca, "smarthost.test", authenticator=authenticator, auth_require_tls=True) as relay:
        extra = (f'relayhost = "127.0.0.1:{relay.port}"\nrelayhost_tls_policy = "encrypt"\n'
                 f'relayhost_auth_file = "{tmp_path / "relay-auth"}"')
        daemon = start(delivery_extra=extra)
        send(daemon, "anyone@elsewhere.test")
        wait_for(lambda: relay.handler.to("anyone@elsewhere.test"), 10, what="delivery via the relayhost")
    assert logins and logins[0][1:] == (b"relayuser", b"s3cret")


def test_transport_map_delivers_into_a_maildir(start, tmp_path):
    boxes = tmp_path / "mail"
    daemon = start(delivery_extra=f'transport = {{ "box.test" = "maildir:{boxes}/%d/%u" }}')
    qid = send(daemon, "carol@box.test", b"Subject: to a maildir\r\n\r\nHello.\r\n")
    new = boxes / "box.test" / "carol" / "new"
    wait_for(lambda: new.is_dir() and os.listdir(new), 10, what="a file in the Maildir")
    (name,) = os.listdir(new)
    assert (new / name).read_bytes().endswith(b"Subject: to a maildir\n\nHello.\n")
    wait_for(lambda: states(daemon, qid) == {"carol@box.test": "delivered"}, 5, what="delivered state")
    assert attempts(daemon, qid)[0]["host"] == "maildir"
