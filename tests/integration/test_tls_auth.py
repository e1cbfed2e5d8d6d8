"""STARTTLS, implicit TLS, AUTH and submission against the real daemon (bin/elemta).

Certificates come from trustme; the clients are smtplib, raw sockets wrapped in ssl, and
swaks where installed.  Cases 17 and 18 of shared/conformance-cases.md are here.
"""

from __future__ import annotations

import base64
import email
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess

import pytest

from elemta.passwords import PasswordFile
from tests.support import Daemon, RawClient, wait_for

trustme = pytest.importorskip("trustme")

PASSWORD = "correct horse battery"
CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[[listeners]]
address = "127.0.0.2:0"
role = "submission"

[[listeners]]
address = "127.0.0.3:0"
role = "submissions"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"

[smtp]
local_domains = ["example.com"]
trusted_networks = []
auth_file = "@SPOOL@/../passwd"
auth_mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]
auth_max_failures = 3
auth_lockout = 300
sender_logins = { "bob" = "bob@example.org, @example.net" }

[[tls.certificates]]
cert_file = "@SPOOL@/../mx.pem"

[[tls.certificates]]
cert_file = "@SPOOL@/../other.crt"
key_file = "@SPOOL@/../other.key"

[tls]
reload_interval = 1

[limits]
ip_connections_per_minute = 0

[queue]
min_free_space = 0

[delivery]
hold = true
"""


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server(tmp_path_factory, ca):
    base = tmp_path_factory.mktemp("tls")
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(base / "mx.pem"))
    other = ca.issue_cert("other.test.example", "*.wild.test.example")
    other.cert_chain_pems[0].write_to_path(str(base / "other.crt"))
    other.private_key_pem.write_to_path(str(base / "other.key"))
    users = PasswordFile(str(base / "passwd"))
    users.set("alice@example.org", PASSWORD, cram_md5=True)
    users.set("bob", PASSWORD)
    daemon = Daemon(base / "d", CONFIG.replace("@SPOOL@/..", str(base))).start()
    yield daemon
    assert daemon.stop() == 0


def one_certificate(base) -> str:
    """CONFIG with only the mx.pem certificate, for a daemon of a test's own."""
    other = '[[tls.certificates]]\ncert_file = "@SPOOL@/../other.crt"\nkey_file = "@SPOOL@/../other.key"\n\n'
    assert other in CONFIG
    return CONFIG.replace(other, "").replace("@SPOOL@/..", str(base))


def at(server, role: str) -> tuple[str, int]:
    """(host, port) of the daemon's listener with this role."""
    return next((host, port) for host, port, r in server.addresses if r == role)


def smtp_to(server, role: str) -> smtplib.SMTP:
    """smtplib connected to a listener; STARTTLS will check the name mx.test.example."""
    smtp = smtplib.SMTP(*at(server, role), timeout=10)
    smtp._host = "mx.test.example"  # what starttls() passes as server_hostname
    return smtp


def client_context(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def code_esc(reply: tuple[int, str]) -> str:
    return f"{reply[0]} {reply[1].split(' ')[0]}"


def tls_client(raw: RawClient, context: ssl.SSLContext, name: str = "mx.test.example") -> None:
    """Switch a RawClient to TLS after the server's 220 to STARTTLS."""
    raw.sock = context.wrap_socket(raw.sock, server_hostname=name)
    raw._buf = b""


def last_body(server) -> bytes:
    with server.db() as db:
        (queue_id,) = db.execute("SELECT queue_id FROM messages ORDER BY created DESC, rowid DESC LIMIT 1").fetchone()
    return server.body(queue_id)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---- STARTTLS ----------------------------------------------------------------------------------


def test_starttls_is_offered_and_mail_is_received_over_it(server, ca):
    with smtp_to(server, "mx") as smtp:
        smtp.ehlo("client.example")
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth"), "no AUTH before TLS on this listener's clear text"
        smtp.starttls(context=client_context(ca))
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        smtp.ehlo("client.example")
        assert not smtp.has_extn("starttls")
        smtp.sendmail("a@example.org", ["user@example.com"], b"Subject: tls\r\n\r\nhi\r\n")
    body = last_body(server)
    received = body.split(b"\r\n\r\n")[0].decode()
    assert "with ESMTPS id" in received and "(using TLSv1." in received


def test_17_starttls_injection_is_discarded(server, ca):
    """Case 17: what is pipelined after STARTTLS in the clear never runs after the handshake."""
    with RawClient(*at(server, "mx")) as c:
        c.cmd("EHLO c.example")
        c.send(b"STARTTLS\r\nMAIL FROM:<a@example.org>\r\n")
        assert code_esc(c.reply()) == "220 2.0.0"
        tls_client(c, client_context(ca))
        # Had the MAIL been kept, its 250 would come first; and MAIL now needs EHLO again.
        assert code_esc(c.cmd("NOOP")) == "250 2.0.0"
        assert code_esc(c.cmd("MAIL FROM:<a@example.org>")) == "503 5.5.1"
        assert c.cmd("EHLO c.example")[0] == 250
        assert code_esc(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"
    wait_for(lambda: "starttls_pipelined" in server.log_text(), 10, what="the log line")


def test_starttls_twice_and_with_arguments(server, ca):
    with RawClient(*at(server, "mx")) as c:
        c.cmd("EHLO c.example")
        assert code_esc(c.cmd("STARTTLS now")) == "501 5.5.4"
        assert code_esc(c.cmd("STARTTLS")) == "220 2.0.0"
        tls_client(c, client_context(ca))
        c.cmd("EHLO c.example")
        assert code_esc(c.cmd("STARTTLS")) == "503 5.5.1"


def test_a_failed_handshake_costs_only_that_connection(server):
    with RawClient(*at(server, "mx")) as c:
        c.cmd("EHLO c.example")
        assert c.cmd("STARTTLS")[0] == 220
        c.send(b"this is not a TLS ClientHello\r\n" * 4)
        assert c.closed_by_server()
    wait_for(lambda: "tls_failed" in server.log_text(), 10, what="tls_failed in the log")
    with smtp_to(server, "mx") as smtp:
        assert smtp.noop()[0] == 250


# ---- implicit TLS and SNI ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mx.test.example", "other.test.example", "a.wild.test.example"])
def test_submissions_speaks_tls_first_and_picks_the_certificate_by_sni(server, ca, name):
    context = client_context(ca)
    with socket.create_connection(at(server, "submissions"), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:  # verifies the name
        assert tls.recv(1024).startswith(b"220 ")


def test_without_sni_the_first_certificate_is_used(server, ca):
    context = client_context(ca)
    context.check_hostname = False
    with socket.create_connection(at(server, "submissions"), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        names = [v for k, v in tls.getpeercert()["subjectAltName"]]
        assert names == ["mx.test.example"]


# ---- AUTH (case 18) ----------------------------------------------------------------------------


def submission_tls(server, ca) -> RawClient:
    c = RawClient(*at(server, "submission"))
    c.cmd("EHLO c.example")
    assert c.cmd("STARTTLS")[0] == 220
    tls_client(c, client_context(ca))
    assert c.cmd("EHLO c.example")[0] == 250  # RFC 3207 §4.2: again, after the handshake
    return c


def test_18_plaintext_auth_needs_tls(server):
    with RawClient(*at(server, "submission")) as c:
        _, text = c.cmd("EHLO c.example")
        assert "AUTH CRAM-MD5" in text.split("\n"), "only CRAM-MD5 in the clear"
        assert code_esc(c.cmd("AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}"))) == "538 5.7.11"
        assert code_esc(c.cmd("MAIL FROM:<bob@example.org>")) == "530 5.7.0"


def test_18_auth_replies(server, ca):
    with submission_tls(server, ca) as c:
        _, text = c.cmd("EHLO c.example")
        assert "AUTH PLAIN LOGIN CRAM-MD5" in text.split("\n")
        assert code_esc(c.cmd("AUTH KERBEROS_V4")) == "504 5.5.4"
        assert code_esc(c.cmd("AUTH PLAIN !!!notbase64")) == "501 5.5.2"
        assert code_esc(c.cmd("AUTH PLAIN " + b64("\0bob\0wrong"))) == "535 5.7.8"
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert code_esc(c.cmd("*")) == "501 5.0.0"
        assert code_esc(c.cmd("AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}"))) == "235 2.7.0"
        assert code_esc(c.cmd("AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}"))) == "503 5.5.1"
    wait_for(lambda: " auth user=bob " in server.log_text(), 10, what="the auth log line")
    text = server.log_text()
    assert PASSWORD not in text and b64(f"\0bob\0{PASSWORD}") not in text


def test_18_smtplib_login_with_every_mechanism(server, ca):
    for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
        with smtp_to(server, "submission") as smtp:
            smtp.starttls(context=client_context(ca))
            smtp.ehlo("c.example")
            code, _ = _auth(smtp, mechanism, "alice@example.org", PASSWORD)
            assert code == 235, mechanism


def _auth(smtp: smtplib.SMTP, mechanism: str, user: str, password: str):
    smtp.user, smtp.password = user, password
    method = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login, "CRAM-MD5": smtp.auth_cram_md5}[mechanism]
    return smtp.auth(mechanism, method, initial_response_ok=mechanism != "CRAM-MD5")


def test_18_too_many_failures_close_and_lock_the_address_out(tmp_path, ca):
    """A server of its own: the lockout would spoil the other tests' AUTH from 127.0.0.1."""
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "mx.pem"))
    PasswordFile(str(tmp_path / "passwd")).set("bob", PASSWORD)
    config = one_certificate(tmp_path)
    daemon = Daemon(tmp_path / "d", config).start()
    try:
        with submission_tls(daemon, ca) as c:
            for _ in range(2):
                assert code_esc(c.cmd("AUTH PLAIN " + b64("\0bob\0guess"))) == "535 5.7.8"
            assert code_esc(c.cmd("AUTH PLAIN " + b64("\0bob\0guess"))) == "535 5.7.8"
            assert code_esc(c.reply()) == "421 4.7.0"
            assert c.closed_by_server()
        with submission_tls(daemon, ca) as c:  # the right password no longer helps
            assert code_esc(c.cmd("AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}"))) == "421 4.7.0"
            assert c.closed_by_server()
    finally:
        assert daemon.stop() == 0


# ---- submission (RFC 6409) ---------------------------------------------------------------------


def test_submission_needs_auth_before_mail(server, ca):
    with submission_tls(server, ca) as c:
        assert code_esc(c.cmd("MAIL FROM:<bob@example.org>")) == "530 5.7.0"


@pytest.mark.parametrize("user, sender, allowed", [
    ("bob", "bob@example.org", True),
    ("bob", "anyone@example.net", True),
    ("bob", "<>", True),
    ("bob", "bob@example.com", False),
    ("alice@example.org", "alice@example.org", True),
    ("alice@example.org", "ALICE@example.org", True),
    ("alice@example.org", "bob@example.org", False),
])
def test_submission_senders_per_login(server, ca, user, sender, allowed):
    with smtp_to(server, "submission") as smtp:
        smtp.starttls(context=client_context(ca))
        smtp.ehlo("c.example")
        # Not smtp.login(): it tries CRAM-MD5 first, which bob has no secret for, and each
        # such failure counts towards the lockout (see smtp.auth_mechanisms in elemta.toml(5)).
        assert _auth(smtp, "PLAIN", user, PASSWORD)[0] == 235
        code, text = smtp.mail("" if sender == "<>" else sender)
        assert (code, text[:5]) == ((250, b"2.1.0") if allowed else (553, b"5.7.1"))


def test_submission_relays_for_a_user_and_adds_date_and_message_id(server, ca):
    context = client_context(ca)
    context.check_hostname = False  # smtplib would check the name against the IP address
    with smtplib.SMTP_SSL(*at(server, "submissions"), timeout=10, context=context) as smtp:
        smtp.ehlo("c.example")
        assert _auth(smtp, "LOGIN", "bob", PASSWORD)[0] == 235
        smtp.sendmail("bob@example.org", ["someone@far.example"], b"Subject: no date\r\n\r\nbody\r\n")
    message = email.message_from_bytes(last_body(server))
    assert message["Date"] and message["Message-ID"].endswith("@mx.test.example>")
    assert "with ESMTPSA id" in message["Received"]
    assert "bob" not in message["Received"]


def test_mx_does_not_relay_without_auth(server, ca):
    with smtp_to(server, "mx") as smtp:
        smtp.starttls(context=client_context(ca))
        smtp.ehlo("c.example")
        smtp.mail("a@example.org")
        assert smtp.rcpt("someone@far.example")[:1] == (550,)


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks is not installed")
def test_swaks_tls_and_auth(server, ca, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    result = subprocess.run(
        ["swaks", "--server", at(server, "submission")[0], "--port", str(at(server, "submission")[1]), "--tls",
         "--tls-ca-path", str(ca_file), "--tls-verify",
         "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", PASSWORD,
         "--from", "bob@example.org", "--to", "someone@far.example", "--helo", "c.example",
         "--timeout", "10"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout and "250 2.0.0 Ok: queued as" in result.stdout


# ---- certificate reload ------------------------------------------------------------------------


def served_serial(address: tuple[str, int], ca, name: str = "mx.test.example") -> int:
    with socket.create_connection(address, timeout=10) as raw, \
            client_context(ca).wrap_socket(raw, server_hostname=name) as tls:
        return int(tls.getpeercert()["serialNumber"], 16)


def test_certificates_reload_on_change_and_keep_the_old_on_a_bad_one(tmp_path, ca):
    pem = tmp_path / "mx.pem"
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(pem))
    config = one_certificate(tmp_path)
    daemon = Daemon(tmp_path / "d", config).start()
    address = at(daemon, "submissions")
    try:
        first = served_serial(address, ca)
        # A renewal written in place is picked up by the mtime check (reload_interval = 1).
        ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(pem))
        wait_for(lambda: served_serial(address, ca) != first, 20, what="the renewed certificate")
        second = served_serial(address, ca)
        # A broken file is logged and the certificate in use stays, on mtime and on SIGHUP.
        pem.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
        wait_for(lambda: "tls_reload_failed" in daemon.log_text(), 20, what="tls_reload_failed")
        daemon.signal(signal.SIGHUP)
        assert served_serial(address, ca) == second
    except BaseException:
        print(daemon.log_text())
        raise
    finally:
        assert daemon.stop() == 0


def test_silent_clients_over_tls_are_timed_out(tmp_path, ca):
    """Python's ssl retries a read that SO_RCVTIMEO ended on a blocking socket, so kernel
    timeouts never freed a session thread whose client went quiet inside TLS."""
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "mx.pem"))
    PasswordFile(str(tmp_path / "passwd")).set("bob", PASSWORD)
    config = one_certificate(tmp_path).replace("[smtp]\n", "[smtp]\ncommand_timeout = 1\ndata_timeout = 1\n", 1)
    daemon = Daemon(tmp_path / "d", config).start()
    try:
        # After STARTTLS, between commands and in the middle of a message: 421 4.4.2, closed.
        with submission_tls(daemon, ca) as c:
            assert code_esc(c.reply()) == "421 4.4.2"
            assert c.closed_by_server()
        with submission_tls(daemon, ca) as c:
            assert c.cmd("AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}"))[0] == 235
            assert c.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            assert c.cmd("RCPT TO:<carol@example.net>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: half a message\r\n")
            assert code_esc(c.reply()) == "421 4.4.2"
            assert c.closed_by_server()
        # Implicit TLS (port 465) with no handshake at all: dropped.
        with RawClient(*at(daemon, "submissions"), read_greeting=False) as c:
            assert c.closed_by_server()
        wait_for(lambda: "tls_failed" in daemon.log_text(), what="the failed handshake in the log")
    finally:
        assert daemon.stop() == 0
