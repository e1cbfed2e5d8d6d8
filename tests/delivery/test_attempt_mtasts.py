"""MTA-STS in a delivery attempt, every part real: a DNS server with the MX and _mta-sts
records, an HTTPS policy host and an SMTP MX with STARTTLS, all on loopback."""

import ssl

import pytest

from elemta.delivery.attempt import Attempter, Settings
from elemta.delivery.dns import Resolver
from elemta.delivery.mtasts_cache import PolicyCache
from elemta.delivery.mtasts_finder import PolicyFinder
from elemta.delivery.router import Route
from elemta.delivery.smtp_pool import Pool
from elemta.queue.jobs import Job, Recipient
from tests.dnsserver import DnsServer
from tests.mx import Mx
from tests.policyserver import POLICY, PolicyServer

RCPT = Recipient(1, "bob@example.test", "example.test", None, (), 0, False)
JOB = Job("Q1", 0.0, "alice@sender.test", 100, 0, None, None, "7BIT", False, (RCPT,))
BODY = b"Subject: hi\r\n\r\nhello\r\n"


def tls_for(ca, name):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


@pytest.fixture
def world(ca, ca_file, tmp_path):
    """Start the parts; world(mx_name=..., cert_name=..., starttls=True, mode=...) -> (attempter, mx)."""
    started = []

    def make(mx_name="mx.example.test", cert_name=None, starttls=True, mode="enforce", sts=True, policy_reply=None):
        host = PolicyServer(ca)
        host.reply = policy_reply or (200, "text/plain", POLICY.replace(b"enforce", mode.encode()), {})
        kwargs = {"tls_context": tls_for(ca, cert_name or mx_name)} if starttls else {}
        mx = Mx(**kwargs).__enter__()
        dns_server = DnsServer({
            "example.test": [("MX", (10, mx_name))],
            mx_name: [("A", "127.0.0.1")],
            "_mta-sts.example.test": [("TXT", "v=STSv1; id=1;")],
            "mta-sts.example.test": [("A", "127.0.0.1")],
        }).__enter__()
        started.extend([host.stop, mx.stop, dns_server.stop])
        resolver = Resolver([dns_server.nameserver], timeout=5.0)
        spool = tmp_path / f"spool{len(started)}"
        spool.mkdir()
        finder = PolicyFinder(PolicyCache(str(spool)), resolver, ca_file=ca_file, port=host.port) if sts else None
        attempter = Attempter(Settings(helo_name="out.test", connect_timeout=5, command_timeout=10,
                                       ca_file=ca_file), resolver, Pool(), sts=finder)
        route = Route("smtp", tuple(resolver.mx_hosts("example.test")), mx.port, tls_policy="dane", mx=True)
        return attempter, mx, route

    yield make
    for stop in reversed(started):
        stop()


def test_enforce_delivers_to_a_named_mx_over_verified_tls(world):
    attempter, mx, route = world()
    out = attempter.run(JOB, BODY, [RCPT], route)
    assert [v.status for v in out.verdicts] == ["ok"]
    assert out.attempts[-1].tls.endswith("(MTA-STS enforce)")
    assert len(mx.handler.received()) == 1


def test_enforce_never_connects_to_an_mx_the_policy_does_not_name(world):
    attempter, mx, route = world(mx_name="mx.attacker.test")
    out = attempter.run(JOB, BODY, [RCPT], route)
    (verdict,) = out.verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.4")
    assert "does not name mx.attacker.test" in verdict.reply
    assert mx.handler.received() == []
    assert [a.ip for a in out.attempts] == [""]  # recorded as skipped: no address was tried


def test_enforce_defers_a_certificate_for_another_name(world):
    attempter, mx, route = world(cert_name="other.test")
    out = attempter.run(JOB, BODY, [RCPT], route)
    (verdict,) = out.verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5")
    assert mx.handler.received() == []  # never in clear instead


def test_enforce_defers_an_mx_without_starttls(world):
    attempter, mx, route = world(starttls=False)
    out = attempter.run(JOB, BODY, [RCPT], route)
    (verdict,) = out.verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.4")
    assert mx.handler.received() == []


def test_testing_mode_and_mta_sts_off_deliver_as_before(world):
    for options in ({"mode": "testing"}, {"sts": False}):
        attempter, mx, route = world(mx_name="mx.attacker.test", cert_name="other.test", **options)
        out = attempter.run(JOB, BODY, [RCPT], route)
        assert [v.status for v in out.verdicts] == ["ok"], options
        assert out.attempts[-1].tls.endswith(" (MTA-STS testing)" if options.get("mode") else "TLS_AES_256_GCM_SHA384")
        assert len(mx.handler.received()) == 1


class Counted:
    def __init__(self):
        self.sessions = []

    def success(self, policy):
        self.sessions.append((policy.type, policy.string[1] if policy.string else "", "ok"))

    def failure(self, policy, result, mx, ip=""):
        self.sessions.append((policy.type, policy.string[1] if policy.string else "", result))


@pytest.mark.parametrize(("options", "counted"), [
    ({}, ("sts", "mode: testing", "ok")),  # a named MX with a good certificate
    ({"cert_name": "other.test"}, ("sts", "mode: testing", "certificate-host-mismatch")),
    ({"mx_name": "mx.attacker.test"}, ("sts", "mode: testing", "validation-failure")),
])
def test_testing_mode_reports_what_enforce_would_have_found_and_delivers_all_the_same(world, options, counted):
    attempter, mx, route = world(mode="testing", **options)
    attempter.tls_reports = reports = Counted()
    out = attempter.run(JOB, BODY, [RCPT], route)
    assert [v.status for v in out.verdicts] == ["ok"] and len(mx.handler.received()) == 1
    assert reports.sessions == [counted]


def test_an_admins_own_policy_for_the_domain_is_kept(world):
    attempter, mx, route = world(mx_name="mx.attacker.test")
    out = attempter.run(JOB, BODY, [RCPT], Route(**{**route.__dict__, "tls_policy": "none"}))
    assert [v.status for v in out.verdicts] == ["ok"]  # "none" for the domain: as configured


def test_mta_sts_required_delivers_only_under_an_enforced_policy(world):
    attempter, mx, route = world()
    out = attempter.run(JOB, BODY, [RCPT], Route(**{**route.__dict__, "tls_policy": "mta-sts"}))
    assert [v.status for v in out.verdicts] == ["ok"] and out.attempts[-1].tls.endswith("(MTA-STS enforce)")
    for options in ({"mode": "testing"}, {"sts": False}):
        attempter, mx, route = world(**options)
        out = attempter.run(JOB, BODY, [RCPT], Route(**{**route.__dict__, "tls_policy": "mta-sts"}))
        (verdict,) = out.verdicts
        assert (verdict.status, verdict.enhanced) == ("transient", "4.7.4"), options
        assert verdict.reply.startswith("MTA-STS required (mta-sts)"), verdict.reply
        assert mx.handler.received() == [] and [a.ip for a in out.attempts] == [""]


def test_may_is_plain_opportunistic_tls_whatever_the_domain_publishes(world):
    attempter, mx, route = world(mx_name="mx.attacker.test", cert_name="other.test")
    out = attempter.run(JOB, BODY, [RCPT], Route(**{**route.__dict__, "tls_policy": "may"}))
    assert [v.status for v in out.verdicts] == ["ok"] and "MTA-STS" not in out.attempts[-1].tls


@pytest.mark.parametrize(("reply", "result"), [
    ((503, "text/plain", b"busy", {}), "sts-policy-fetch-error"),
    ((200, "text/plain", b"version: STSv1\r\nmode: sometimes\r\n", {}), "sts-policy-invalid"),
])
def test_a_policy_that_cannot_be_had_is_reported_once_per_fetch(world, reply, result):
    attempter, mx, route = world(policy_reply=reply)
    attempter.tls_reports = reports = Counted()
    for _ in range(2):  # the second delivery finds the failure held off: not fetched, not counted
        out = attempter.run(JOB, BODY, [RCPT], route)
        assert [v.status for v in out.verdicts] == ["ok"]  # no policy: delivered as may
    assert reports.sessions[0] == ("sts", "", result)
    assert [s for s in reports.sessions if s[2] == result] == [("sts", "", result)]
