"""TLS sessions counted and the daily reports sent (RFC 8460), with a real DNS server on
loopback for the `_smtp._tls` records and a real queue to send through."""

import email
import email.policy
import gzip
import json
import os
import stat

import pytest

from elemta.delivery.dns import Resolver
from elemta.delivery.tlsrpt import PolicyKey
from elemta.delivery.tlsrpt_store import Reports
from elemta.queue.store import Store
from tests.dnsserver import DnsServer
from tests.policyserver import PolicyServer
from tests.queue import stored

DAY = 1796342400.0  # 2026-12-04 00:00 UTC
TLSA = PolicyKey("tlsa", "dane.test", ("3 1 1 " + "ab" * 32,), ("mx.dane.test",))
NONE = PolicyKey("no-policy-found", "plain.test")


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def dns():
    with DnsServer({
        "_smtp._tls.dane.test": [("TXT", "v=TLSRPTv1; rua=mailto:tls@reports.test,https://reports.test/v1")],
        "_smtp._tls.plain.test": [("TXT", "v=spf1 -all")],
    }) as server:
        yield server


@pytest.fixture
def world(tmp_path, dns):
    store = Store(str(tmp_path / "queue.db"))
    store.open()
    clock = Clock(DAY + 3600)
    logged = []
    reports = []

    def make():
        r = Reports(str(tmp_path), hostname="relay.test", resolver=Resolver([dns.nameserver], timeout=2),
                    enqueue=store.enqueue, new_id=store.new_id, clock=clock,
                    log=lambda event, **fields: logged.append((event, fields)))
        reports.append(r)
        return r

    yield make, store, clock, logged
    for r in reports:
        r.close()
    store.close()


def queued_reports(store):
    with stored._reading(store.path) as conn:
        rows = conn.execute("SELECT m.queue_id, m.sender, b.data FROM messages m JOIN bodies b USING (queue_id)"
                            " WHERE m.listener = 'tlsrpt'").fetchall()
    return [(sender, email.message_from_bytes(bytes(data), policy=email.policy.default))
            for _, sender, data in rows]


def test_a_day_that_is_over_gets_its_report_through_the_queue_with_the_counts(world):
    make, store, clock, logged = world
    reports = make()
    assert [e for e, _ in logged] == []
    for _ in range(3):
        reports.success(TLSA)
    reports.failure(TLSA, "tlsa-invalid", "mx.dane.test", "192.0.2.1")
    reports.success(NONE)
    assert reports.send_due() == 0  # the day is not over
    clock.now = DAY + 86400 + 60
    assert reports.send_due() == 1  # dane.test; plain.test publishes no record
    ((sender, msg),) = queued_reports(store)
    assert sender == "" and msg["To"] == "tls@reports.test" and msg["TLS-Report-Domain"] == "dane.test"
    report = json.loads(gzip.decompress(msg.get_payload()[1].get_content()))
    (policy,) = report["policies"]
    assert policy["policy"] == {"policy-type": "tlsa", "policy-domain": "dane.test",
                                "policy-string": list(TLSA.string), "mx-host": ["mx.dane.test"]}
    assert policy["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 1}
    assert policy["failure-details"] == [{"result-type": "tlsa-invalid", "failed-session-count": 1,
                                          "receiving-mx-hostname": "mx.dane.test", "receiving-ip": "192.0.2.1"}]
    assert report["date-range"]["start-datetime"] == "2026-12-04T00:00:00Z"
    assert reports.send_due() == 0  # sent once; plain.test's counts were dropped
    assert [f["domain"] for e, f in logged if e == "tls_report"] == ["dane.test", "plain.test"]
    # the https: URI's host does not resolve here: said in the log, the mailed copy stands
    assert [f["uri"] for e, f in logged if e == "tls_report_post_failed"] == ["https://reports.test/v1"]


def test_counts_outlive_a_restart_and_a_dns_failure_keeps_them_for_the_next_try(world, dns):
    make, store, clock, _ = world
    first = make()
    first.success(TLSA)
    first.close()  # writes what it counted
    mode = stat.S_IMODE(os.stat(first.path).st_mode)
    assert mode & 0o007 == 0, oct(mode)  # the domains mail went to: elemta and its group only, as queue.db
    second = make()
    second.success(TLSA)
    clock.now = DAY + 86400 + 60
    dns.fail("_smtp._tls.dane.test", "servfail")
    assert second.send_due() == 0 and queued_reports(store) == []
    dns.fail("_smtp._tls.dane.test", None)
    assert second.send_due() == 1
    ((_, msg),) = queued_reports(store)
    report = json.loads(gzip.decompress(msg.get_payload()[1].get_content()))
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 2


def test_sessions_count_on_their_utc_day(world):
    make, store, clock, _ = world
    reports = make()
    clock.now = DAY - 1  # 2026-12-03 23:59:59
    reports.success(TLSA)
    clock.now = DAY + 1
    reports.success(TLSA)
    assert reports.send_due() == 1  # only 12-03 is over
    ((_, msg),) = queued_reports(store)
    report = json.loads(gzip.decompress(msg.get_payload()[1].get_content()))
    assert report["date-range"]["start-datetime"] == "2026-12-03T00:00:00Z"
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1


def test_an_https_uri_gets_the_gzipped_report_posted(tmp_path, ca, ca_file):
    host = PolicyServer(ca, name="reports.test")
    try:
        with DnsServer({
            "_smtp._tls.dane.test": [("TXT", f"v=TLSRPTv1; rua=https://reports.test:{host.port}/v1/tlsrpt")],
            "reports.test": [("A", "127.0.0.1")],
        }) as dns:
            store = Store(str(tmp_path / "queue.db"))
            store.open()
            clock = Clock(DAY)
            reports = Reports(str(tmp_path), hostname="relay.test", resolver=Resolver([dns.nameserver], timeout=2),
                              enqueue=store.enqueue, new_id=store.new_id, clock=clock, ca_file=ca_file)
            reports.success(TLSA)
            clock.now = DAY + 86400
            reports.housekeeping()  # in a thread of its own
            reports.close()  # waits for it
            store.close()
            assert queued_reports(store) == []  # no mailto: no message
    finally:
        host.stop()
    ((path, media_type, body),) = host.posts
    assert (path, media_type) == ("/v1/tlsrpt", "application/tlsrpt+gzip")
    report = json.loads(gzip.decompress(body))
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
