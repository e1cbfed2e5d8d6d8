"""REQUIRETLS (RFC 8689) end to end, every part real: bin/elemta takes a message with
REQUIRETLS over STARTTLS, and relays it over DANE (zones signed with ldns-signzone, served by
nsd, validated by unbound) to a loopback MX that offers REQUIRETLS; mail to a domain without
DANE or MTA-STS bounces with 5.7.30, the report sent without REQUIRETLS and without the body."""

from __future__ import annotations

import email
import email.policy
import smtplib
import ssl

import pytest

from tests.dnssec import DnssecTestbed, needs_dane, spki_sha256
from tests.mx import Mx
from tests.support import Daemon, wait_for

trustme = pytest.importorskip("trustme")
pytestmark = needs_dane

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "relay.test"

[[tls.certificates]]
cert_file = "{cert}"

[queue]
min_free_space = 0

[delivery]
resolvers = ["{dns}"]
mx_port = {mx_port}
dns_timeout = 5
"""

BODY = b"Subject: the secret plan\r\n\r\nMeet at noon.\r\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ca = trustme.CA()
    base = tmp_path_factory.mktemp("requiretls")
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(base / "relay.pem"))
    leaf = ca.issue_cert("mx.good.test")
    spki = spki_sha256(leaf)
    mx_zone = ["@ IN MX 10 mx", "mx IN A 127.0.0.1"]
    zones = {"good.test": [*mx_zone, f"_25._tcp.mx IN TLSA 3 1 1 {spki}"], "plain.test": mx_zone,
             "sender.test": mx_zone}
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    (base / "dnssec").mkdir()
    with DnssecTestbed(base / "dnssec", zones, signed={"good.test"}) as bed, \
            Mx(tls_context=context, requiretls=True) as mx:
        config = CONFIG.format(cert=base / "relay.pem", dns=bed.nameserver, mx_port=mx.port)
        daemon = Daemon(base / "d", config).start()
        try:
            yield daemon, mx
        finally:
            daemon.stop()


def send(daemon: Daemon, rcpt: str, *, tls: bool = True, mail_params: str = " REQUIRETLS") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.test")
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo("client.test")
            assert client.has_extn("requiretls")
        else:
            assert not client.has_extn("requiretls")
        code, text = client.docmd("MAIL", "FROM:<alice@sender.test>" + mail_params)
        if code != 250:
            return code, text.decode()
        assert client.docmd("RCPT", f"TO:<{rcpt}>")[0] == 250
        code, text = client.data(BODY)
    return code, text.decode()


def test_a_requiretls_message_goes_on_over_dane_with_the_parameter(world):
    daemon, mx = world
    code, text = send(daemon, "bob@good.test")
    assert code == 250, text
    wait_for(lambda: mx.handler.to("bob@good.test"), 20, what="the message at the DANE MX")
    (got,) = mx.handler.to("bob@good.test")
    assert "REQUIRETLS" in got.mail_options and got.data.endswith(BODY)
    qid = text.rsplit(" ", 1)[1]

    def attempt_tls():  # the attempt is written after the MX has answered: wait for it
        with daemon.db() as conn:
            row = conn.execute("SELECT tls FROM attempts WHERE queue_id = ?", (qid,)).fetchone()
        return row[0] if row else None

    wait_for(attempt_tls, 20, what="the attempt in the queue")
    assert attempt_tls().endswith("(DANE 3 1 1)")


def test_a_requiretls_message_to_a_domain_without_dane_or_mta_sts_bounces_with_5_7_30(world):
    daemon, mx = world
    code, text = send(daemon, "carol@plain.test")
    assert code == 250, text
    wait_for(lambda: mx.handler.to("alice@sender.test"), 20, what="the report to the sender")
    assert mx.handler.to("carol@plain.test") == []
    (report,) = mx.handler.to("alice@sender.test")
    assert report.mail_from == "<>" and "REQUIRETLS" not in report.mail_options
    parsed = email.message_from_bytes(report.data, policy=email.policy.default)
    status = parsed.get_payload()[1].get_payload()[1]
    assert (status["Action"], status["Status"]) == ("failed", "5.7.30")
    assert parsed.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"Meet at noon." not in report.data


def test_requiretls_without_tls_is_refused(world):
    daemon, _ = world
    assert send(daemon, "bob@good.test", tls=False) == (530, "5.7.10 REQUIRETLS needs TLS: send STARTTLS first")
