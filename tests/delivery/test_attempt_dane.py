"""DANE in a delivery attempt, every part real: zones signed with ldns-signzone and served by nsd,
unbound validating them, an SMTP MX with STARTTLS whose certificate the TLSA records name (or
do not), all on loopback."""

import ssl

import pytest

from elemta.delivery.attempt import Attempter, Settings
from elemta.delivery.dane_dns import TlsaLookup
from elemta.delivery.dns import Resolver
from elemta.delivery.router import Route
from elemta.delivery.smtp_pool import Pool
from elemta.queue.jobs import Job, Recipient
from tests.dnssec import DnssecTestbed, needs_dane, spki_sha256
from tests.mx import Mx

pytestmark = needs_dane

BODY = b"Subject: hi\r\n\r\nhello\r\n"


def job_for(domain, requiretls=False):
    rcpt = Recipient(1, f"bob@{domain}", domain, None, (), 0, False)
    return Job("Q1", 0.0, "alice@sender.test", 100, 0, None, None, "7BIT", False, (rcpt,), requiretls), rcpt



@pytest.fixture(scope="module")
def leaf(ca):
    return ca.issue_cert("not-the-mx-name.test")  # DANE-EE: the names in it do not matter


@pytest.fixture(scope="module")
def testbed(leaf, tmp_path_factory):
    good, wrong = spki_sha256(leaf), "0" * 64

    def mx(tlsa):
        return ["@ IN MX 10 mx", "mx IN A 127.0.0.1"] + ([f"_25._tcp.mx IN TLSA 3 1 1 {tlsa}"] if tlsa else [])

    zones = {"good.test": mx(good), "wrong.test": mx(wrong), "bogus.test": mx(good), "plain.test": mx(good),
             "none.test": mx(None),
             # RFC 7672 §2.2.3: the MX host is a CNAME; TLSA records where it leads, or at its own name.
             "alias.test": ["@ IN MX 10 mx", "mx IN CNAME real", "real IN A 127.0.0.1",
                            f"_25._tcp.real IN TLSA 3 1 1 {good}", f"_25._tcp.mx IN TLSA 3 1 1 {wrong}"],
             "ownname.test": ["@ IN MX 10 mx", "mx IN CNAME real", "real IN A 127.0.0.1",
                              f"_25._tcp.mx IN TLSA 3 1 1 {good}"],
             # A relayhost's TLSA records are at its own port, an ephemeral one here: a wildcard.
             "relay.test": ["relay IN A 127.0.0.1", f"*._tcp.relay IN TLSA 3 1 1 {good}",
                            "wrong IN A 127.0.0.1", f"*._tcp.wrong IN TLSA 3 1 1 {wrong}"]}
    with DnssecTestbed(tmp_path_factory.mktemp("dnssec"), zones,
                       signed={"good.test", "wrong.test", "bogus.test", "none.test", "relay.test", "alias.test",
                               "ownname.test"},
                       after_signing={"bogus.test": (good, wrong)}) as bed:
        yield bed


@pytest.fixture(params=[False, True], ids=["mx", "mx-requiretls"])
def mx(leaf, request):
    """The MX, without and with REQUIRETLS offered: what does not involve REQUIRETLS must not
    change with it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    with Mx(tls_context=context, requiretls=request.param) as server:
        yield server


@pytest.fixture
def requiretls_mx(leaf):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    with Mx(tls_context=context, requiretls=True) as server:
        yield server


class Counted:
    """What TLS-RPT is told (tlsrpt_store.Reports' two methods), kept in a list."""

    def __init__(self):
        self.sessions = []

    def success(self, policy):
        self.sessions.append((policy.type, policy.mx_host, "ok"))

    def failure(self, policy, result, mx, ip=""):
        self.sessions.append((policy.type, policy.mx_host, result))


def attempt(testbed, mx, domain, dane=True, policy="dane", relayhost=None, requiretls=False, body=BODY,
            reports=None, pool=None):
    resolver = Resolver([testbed.nameserver], timeout=5.0)
    attempter = Attempter(Settings(helo_name="out.test", connect_timeout=5, command_timeout=10), resolver,
                          pool or Pool(), dane=TlsaLookup([testbed.nameserver], timeout=5) if dane else None,
                          tls_reports=reports)
    job, rcpt = job_for(domain, requiretls)
    if relayhost:
        route = Route("smtp", (relayhost,), mx.port, tls_policy=policy)
    else:
        route = Route("smtp", tuple(resolver.mx_hosts(domain)), mx.port, tls_policy=policy, mx=True)
    return attempter.run(job, body, [rcpt], route)


def test_authenticated_tlsa_records_that_match_deliver_over_dane(testbed, mx):
    out = attempt(testbed, mx, "good.test")
    assert [v.status for v in out.verdicts] == ["ok"]
    assert out.attempts[-1].tls.endswith("(DANE 3 1 1)")
    assert len(mx.handler.received()) == 1


def test_records_that_do_not_match_defer_and_nothing_goes_in_clear(testbed, mx):
    (verdict,) = attempt(testbed, mx, "wrong.test").verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5")
    assert "no matching DANE TLSA records" in verdict.reply
    assert mx.handler.received() == []


def test_a_bogus_tlsa_answer_skips_the_host(testbed, mx):
    out = attempt(testbed, mx, "bogus.test")
    (verdict,) = out.verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5")
    assert verdict.reply.startswith("DANE: the TLSA lookup failed")
    assert [a.ip for a in out.attempts] == [""] and mx.handler.received() == []


@pytest.mark.parametrize("domain", ["plain.test", "none.test"])
def test_an_unsigned_zone_or_no_tlsa_record_is_opportunistic_tls(testbed, mx, domain):
    out = attempt(testbed, mx, domain)
    assert [v.status for v in out.verdicts] == ["ok"]
    assert "DANE" not in out.attempts[-1].tls and len(mx.handler.received()) == 1


def test_with_dane_off_the_records_are_not_looked_at(testbed, mx):
    out = attempt(testbed, mx, "wrong.test", dane=False)
    assert [v.status for v in out.verdicts] == ["ok"]


def test_dane_only_delivers_over_dane_and_skips_hosts_without_usable_records(testbed, mx):
    out = attempt(testbed, mx, "good.test", policy="dane-only")
    assert [v.status for v in out.verdicts] == ["ok"] and out.attempts[-1].tls.endswith("(DANE 3 1 1)")
    for domain in ("plain.test", "none.test"):
        out = attempt(testbed, mx, domain, policy="dane-only")
        (verdict,) = out.verdicts
        assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5"), domain
        assert verdict.reply.startswith("DANE required (dane-only)"), verdict.reply
        assert [a.ip for a in out.attempts] == [""]  # skipped: never connected
    assert len(mx.handler.received()) == 1


def test_dane_only_without_a_trusted_resolver_sends_nothing(testbed, mx):
    (verdict,) = attempt(testbed, mx, "good.test", dane=False, policy="dane-only").verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5")
    assert "DANE is not used" in verdict.reply and mx.handler.received() == []


@pytest.mark.parametrize("policy", ["may", "encrypt"])
def test_a_fixed_policy_does_not_look_at_the_records(testbed, mx, policy):
    out = attempt(testbed, mx, "wrong.test", policy=policy)
    assert [v.status for v in out.verdicts] == ["ok"] and "DANE" not in out.attempts[-1].tls


def test_a_relayhost_named_by_the_config_is_its_own_tlsa_base_domain(testbed, mx):
    """RFC 7672 §2.2.3: no MX lookup, the configured name is trusted, its TLSA records are at
    _PORT._tcp.<name>."""
    out = attempt(testbed, mx, "elsewhere.example", policy="dane-only", relayhost="relay.relay.test")
    assert [v.status for v in out.verdicts] == ["ok"] and out.attempts[-1].tls.endswith("(DANE 3 1 1)")
    (verdict,) = attempt(testbed, mx, "elsewhere.example", policy="dane", relayhost="wrong.relay.test").verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5")
    assert len(mx.handler.received()) == 1


def test_requiretls_goes_over_dane_with_the_parameter_passed_on(testbed, requiretls_mx):
    out = attempt(testbed, requiretls_mx, "good.test", requiretls=True)
    assert [v.status for v in out.verdicts] == ["ok"] and out.attempts[-1].tls.endswith("(DANE 3 1 1)")
    (received,) = requiretls_mx.handler.received()
    assert "REQUIRETLS" in received.mail_options


@pytest.mark.parametrize("domain", ["plain.test", "none.test"])
def test_requiretls_without_authenticated_tls_fails_for_good_and_connects_nowhere(testbed, requiretls_mx, domain):
    out = attempt(testbed, requiretls_mx, domain, requiretls=True)
    (verdict,) = out.verdicts
    assert (verdict.status, verdict.enhanced) == ("permanent", "5.7.30")
    assert verdict.reply.startswith("REQUIRETLS: mx.") and "without TLS authenticated by DANE or MTA-STS" in verdict.reply
    assert [(a.outcome, a.ip) for a in out.attempts] == [("failed", "")]
    assert requiretls_mx.handler.connections() == 0 and requiretls_mx.handler.received() == []


def test_requiretls_to_a_next_hop_that_does_not_offer_it_fails_after_tls(testbed, leaf):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    with Mx(tls_context=context) as plain_mx:
        out = attempt(testbed, plain_mx, "good.test", requiretls=True)
        (verdict,) = out.verdicts
        assert (verdict.status, verdict.enhanced) == ("permanent", "5.7.30")
        assert "does not offer REQUIRETLS" in verdict.reply and plain_mx.handler.received() == []
        assert out.attempts[-1].tls.endswith("(DANE 3 1 1)")  # it got as far as authenticated TLS


def test_a_bogus_answer_still_defers_a_requiretls_message(testbed, requiretls_mx):
    (verdict,) = attempt(testbed, requiretls_mx, "bogus.test", requiretls=True).verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5")  # DANE's rule: try again later


def test_tls_required_no_lets_a_message_past_dane_records_that_do_not_match(testbed, mx):
    body = b"TLS-Required: No\r\nSubject: hi\r\n\r\nhello\r\n"
    out = attempt(testbed, mx, "wrong.test", body=body)
    assert [v.status for v in out.verdicts] == ["ok"] and "DANE" not in out.attempts[-1].tls
    # ... but not past REQUIRETLS, which wins over the header (RFC 8689 §4.2.2)
    (verdict,) = attempt(testbed, mx, "wrong.test", body=body, requiretls=True).verdicts
    assert (verdict.status, verdict.enhanced) == ("transient", "4.7.5")


def test_tls_reports_count_each_new_session_under_the_policy_that_applied(testbed, requiretls_mx):
    counted, pool = Counted(), Pool()
    for domain in ("good.test", "good.test", "wrong.test", "bogus.test", "plain.test"):
        attempt(testbed, requiretls_mx, domain, reports=counted, pool=pool)
    attempt(testbed, requiretls_mx, "none.test", policy="dane-only", reports=counted)
    assert counted.sessions == [
        ("tlsa", ("mx.good.test",), "ok"),  # the second message reused the connection: one session
        ("tlsa", ("mx.wrong.test",), "tlsa-invalid"),
        ("tlsa", ("mx.bogus.test",), "dnssec-invalid"),
        ("no-policy-found", (), "ok"),
        ("tlsa", ("mx.none.test",), "dane-required"),
    ]
    pool.close_all()


def test_a_tls_report_s_own_delivery_is_not_counted(testbed, mx):
    counted = Counted()
    body = b"TLS-Report-Domain: good.test\r\nSubject: Report Domain: good.test\r\n\r\nreport\r\n"
    assert [v.status for v in attempt(testbed, mx, "good.test", body=body, reports=counted).verdicts] == ["ok"]
    assert counted.sessions == []


@pytest.mark.parametrize("domain", ["alias.test", "ownname.test"])
def test_an_mx_host_that_is_a_secure_cname_uses_the_tlsa_records_where_it_leads_first(testbed, mx, domain):
    """RFC 7672 §2.2.3: alias.test has matching records at the CNAME's target (and records that
    do not match at the alias, which must not be used); ownname.test only at the alias."""
    out = attempt(testbed, mx, domain, policy="dane-only")
    assert [v.status for v in out.verdicts] == ["ok"], out.verdicts
    assert out.attempts[-1].tls.endswith("(DANE 3 1 1)")


def test_requiretls_mail_goes_into_a_mailbox_over_lmtp_as_any_mail(testbed):
    """LMTP is final delivery (a local Dovecot, often on 127.0.0.1:24 without TLS), not a relay."""
    with Mx(lmtp=True) as lmtp:
        resolver = Resolver([testbed.nameserver], timeout=5.0)
        attempter = Attempter(Settings(helo_name="out.test", connect_timeout=5, command_timeout=10), resolver,
                              Pool())
        job, rcpt = job_for("local.test", requiretls=True)
        out = attempter.run(job, BODY, [rcpt], Route("lmtp", ("127.0.0.1",), lmtp.port, tls_policy="none"))
        assert [v.status for v in out.verdicts] == ["ok"] and len(lmtp.handler.received()) == 1
        assert "REQUIRETLS" not in lmtp.handler.received()[0].mail_options
