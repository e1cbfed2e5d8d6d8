"""TLS reports (RFC 8460) end to end: bin/elemta delivers over DANE (a zone signed with
ldns-signzone, served by nsd, validated by unbound) to a loopback MX, once with TLSA records
that match and once with records that do not; when the day is over, each domain's report goes
through elemta's own queue to the address its _smtp._tls record names, with the right counts,
signed with the dkim plugin's key for elemta's hostname."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import smtplib
import sqlite3
import ssl

import dkim
import pytest

from elemta.delivery import tlsrpt
from elemta.plugins.builtin import dkim_keys
from tests.delivery.test_tlsrpt import check_schema
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

[queue]
min_free_space = 0

[delivery]
resolvers = ["{dns}"]
mx_port = {mx_port}
dns_timeout = 5

[[plugins]]
use = "dkim"
[plugins.options]
verify = false
keys = [{{ domain = "relay.test", selector = "s1", key_file = "{key}" }}]
"""


def send(daemon: Daemon, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("alice@sender.test", [rcpt], b"Subject: hello\r\n\r\nHello.\r\n")


def test_the_days_reports_reach_each_domain_with_its_counts(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.good.test")
    spki = spki_sha256(leaf)
    rua = '_smtp._tls IN TXT "v=TLSRPTv1; rua=mailto:tls@reports.test"'
    mx_zone = ["@ IN MX 10 mx", "mx IN A 127.0.0.1"]
    zones = {"good.test": [*mx_zone, f"_25._tcp.mx IN TLSA 3 1 1 {spki}", rua],
             "wrong.test": [*mx_zone, f"_25._tcp.mx IN TLSA 3 1 1 {'0' * 64}", rua],
             "reports.test": mx_zone}
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    private, public = dkim_keys.generate("ed25519")
    dkim_keys.write_key(tmp_path / "relay.test.s1.key", private)
    (tmp_path / "dnssec").mkdir()
    with DnssecTestbed(tmp_path / "dnssec", zones, signed={"good.test", "wrong.test"}) as bed, \
            Mx(tls_context=context) as mx:
        config = CONFIG.format(dns=bed.nameserver, mx_port=mx.port, key=tmp_path / "relay.test.s1.key")
        daemon = Daemon(tmp_path / "d", config).start()
        try:
            send(daemon, "bob@good.test")
            send(daemon, "carol@wrong.test")
            wait_for(lambda: mx.handler.to("bob@good.test"), 20, what="the delivery over DANE")
            with daemon.db() as conn:
                wait_for(lambda: conn.execute("SELECT count(*) FROM attempts WHERE outcome = 'deferred'"
                                              ).fetchone()[0] == 1, 20, what="the deferral for wrong.test")
        finally:
            assert daemon.stop() == 0  # writes the counts
        # The day is over: what was counted today becomes yesterday's.
        path = daemon.spool / "tlsrpt.db"
        with sqlite3.connect(path) as conn:
            (days,) = conn.execute("SELECT count(DISTINCT day) FROM sessions").fetchone()
            assert days == 1
            conn.execute("UPDATE sessions SET day = '2026-12-04'")
        conn.close()
        daemon = Daemon(tmp_path / "d", config).start()
        try:
            wait_for(lambda: len(mx.handler.to("tls@reports.test")) == 2, 20, what="two reports")
        finally:
            assert daemon.stop() == 0
        with sqlite3.connect(path) as conn:  # sent, and the reports' own deliveries not counted
            assert conn.execute("SELECT day, domain FROM sessions").fetchall() == []
        conn.close()
    reports = {}
    record = dkim_keys.record_value("ed25519", public).encode()
    for got in mx.handler.to("tls@reports.test"):
        assert got.mail_from == "<>"
        assert got.data.startswith(b"DKIM-Signature: ") and b"d=relay.test" in got.data.split(b"\r\n\r\n")[0]
        assert dkim.verify(got.data, dnsfunc=lambda name, timeout=5: record if name == b"s1._domainkey.relay.test."
                           else None)
        msg = email.message_from_bytes(got.data, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
        attached = msg.get_payload()[1]
        assert attached.get_content_type() == tlsrpt.MEDIA_TYPE
        report = json.loads(gzip.decompress(attached.get_content()))
        check_schema(report)
        reports[msg["TLS-Report-Domain"]] = report
    assert set(reports) == {"good.test", "wrong.test"}
    (good,) = reports["good.test"]["policies"]
    assert good["policy"] == {"policy-type": "tlsa", "policy-domain": "good.test",
                              "policy-string": [f"3 1 1 {spki}"], "mx-host": ["mx.good.test"]}
    assert good["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}
    (wrong,) = reports["wrong.test"]["policies"]
    assert wrong["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert wrong["failure-details"] == [{"result-type": "tlsa-invalid", "failed-session-count": 1,
                                         "receiving-mx-hostname": "mx.wrong.test", "receiving-ip": "127.0.0.1"}]
    assert reports["good.test"]["date-range"]["start-datetime"] == "2026-12-04T00:00:00Z"
