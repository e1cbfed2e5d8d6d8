"""The dmarc plugin against a real DNS server on loopback, through elemta's cached resolver,
with the Debian Public Suffix List (and small lists of our own for its rules)."""

from __future__ import annotations

import os

import pytest

from elemta.dnscache import Resolver
from elemta.plugins import api
from elemta.plugins.builtin.dmarc import (
    PSL_PATH,
    DmarcPlugin,
    Policy,
    PublicSuffixList,
    parse_auth_result,
    parse_record,
)
from elemta.plugins.builtin.spf import SpfPlugin
from tests.dnsserver import DnsServer
from tests.support import Clock

ZONES = {
    "_dmarc.reject.test": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@reject.test", 300)],
    "_dmarc.quarantine.test": [("TXT", "v=DMARC1; p=quarantine", 300)],
    "_dmarc.monitor.test": [("TXT", "v=DMARC1; p=none; rua=mailto:d@monitor.test", 300)],
    "_dmarc.strict.test": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s", 300)],
    "_dmarc.parent.test": [("TXT", "v=DMARC1; p=none; sp=reject", 300)],
    # A subdomain with a record of its own: its p applies, not the parent's sp.
    "_dmarc.own.parent.test": [("TXT", "v=DMARC1; p=quarantine", 300)],
    "_dmarc.dup.parent.test": [("TXT", "v=DMARC1; p=none", 300), ("TXT", "v=DMARC1; p=quarantine", 300)],
    "_dmarc.example.co.uk": [("TXT", "v=DMARC1; p=reject", 300)],
    "_dmarc.sample.test": [("TXT", "v=DMARC1; p=reject; pct=0", 300)],
    "_dmarc.halfq.test": [("TXT", "v=DMARC1; p=quarantine; pct=50", 300)],
    "_dmarc.twice.test": [("TXT", "v=DMARC1; p=reject", 300), ("TXT", "v=DMARC1; p=none", 300)],
    "_dmarc.nopolicy.test": [("TXT", "v=DMARC1; p=bogus", 300)],
    "_dmarc.rua.test": [("TXT", "v=DMARC1; p=bogus; rua=mailto:d@rua.test", 300)],
    "_dmarc.other.test": [("TXT", "spf is elsewhere", 300), ("TXT", "v=DMARC1;p=reject;foo=bar", 300)],
    "_dmarc.temp.test": [("TXT", "v=DMARC1; p=reject", 300)],
    "_dmarc.spf.test": [("TXT", "v=DMARC1; p=reject", 300)],
    "spf.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", 300)],
    "plain.test": [("A", "192.0.2.1", 300)],
}


class Fixed:
    """A predictable rng for pct sampling: random() returns the given value."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


@pytest.fixture
def server():
    with DnsServer(ZONES) as server:
        yield server


@pytest.fixture
def services(server, tmp_path):
    resolver = Resolver([server.nameserver], timeout=2)
    return api.Services(hostname="mx.test", spool_dir=str(tmp_path), dns=resolver, authserv_id="mx.test")


def make_plugin(services, **options):
    plugin = DmarcPlugin("dmarc")
    plugin.configure({**DmarcPlugin.options, **options})
    plugin.start(services)
    return plugin


@pytest.fixture
def plugin(services):
    return make_plugin(services)


def context(from_field, auth_results=(), **conn):
    raw = f"From: {from_field}\r\nTo: bob@mx.test\r\nSubject: hi\r\n\r\nHello\r\n".encode()
    return api.Context(
        "on_message",
        connection=api.Connection(ip="127.0.0.9", helo="client.example", **conn),
        transaction=api.Transaction(queue_id="q1", sender="x@elsewhere.test"),
        message=api.Message(raw),
        auth_results=list(auth_results),
    )


def run(plugin, from_field, *auth_results, **conn):
    ctx = context(from_field, auth_results, **conn)
    return ctx, plugin.on_message(ctx)


def dmarc_result(verdict):
    (result,) = verdict.auth_results
    return result


SPF_FAIL = "spf=fail smtp.mailfrom=x@elsewhere.test"
DKIM_NONE = "dkim=none"


# -- pass and fail ------------------------------------------------------------------------


def test_pass_by_aligned_spf_only(plugin):
    ctx, verdict = run(plugin, "a@reject.test", "spf=pass smtp.mailfrom=bounces@reject.test", DKIM_NONE)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == "dmarc=pass (p=reject sp=reject dis=none) header.from=reject.test"
    assert ctx.transaction.notes["dmarc"]["result"] == "pass"


def test_pass_by_aligned_dkim_only(plugin):
    _, verdict = run(plugin, "Alice <a@reject.test>", SPF_FAIL,
                     "dkim=pass (good signature) header.d=reject.test header.s=s1")
    assert verdict.action == "continue"
    assert dmarc_result(verdict).startswith("dmarc=pass ")


def test_unaligned_passes_fail(plugin):
    # Both pass, neither for the From domain's organization.
    _, verdict = run(plugin, "a@reject.test", "spf=pass smtp.mailfrom=x@elsewhere.test",
                     "dkim=pass header.d=elsewhere.test header.s=s1")
    assert (verdict.action, verdict.code, verdict.esc) == ("reject", 550, "5.7.1")
    assert verdict.text == "DMARC policy of reject.test rejects this message"
    assert dmarc_result(verdict) == "dmarc=fail (p=reject sp=reject dis=reject) header.from=reject.test"


def test_aligned_but_not_passing_fails(plugin):
    _, verdict = run(plugin, "a@reject.test", "spf=softfail smtp.mailfrom=x@reject.test",
                     "dkim=fail (body hash mismatch) header.d=reject.test header.s=s1")
    assert verdict.action == "reject"


def test_null_sender_aligns_through_the_helo(plugin):
    _, verdict = run(plugin, "a@reject.test", "spf=pass smtp.helo=mail.reject.test")
    assert dmarc_result(verdict).startswith("dmarc=pass ")


def test_relaxed_alignment_takes_subdomains(plugin):
    _, verdict = run(plugin, "a@reject.test", "spf=pass smtp.mailfrom=x@bounce.reject.test")
    assert dmarc_result(verdict).startswith("dmarc=pass ")
    _, verdict = run(plugin, "a@reject.test", "dkim=pass header.d=mail.reject.test header.s=s1")
    assert dmarc_result(verdict).startswith("dmarc=pass ")


def test_strict_alignment_wants_the_same_name(plugin):
    for result in ("spf=pass smtp.mailfrom=x@bounce.strict.test", "dkim=pass header.d=mail.strict.test header.s=s"):
        _, verdict = run(plugin, "a@strict.test", result)
        assert verdict.action == "reject", result
    for result in ("spf=pass smtp.mailfrom=x@strict.test", "dkim=pass header.d=strict.test header.s=s"):
        _, verdict = run(plugin, "a@strict.test", result)
        assert dmarc_result(verdict).startswith("dmarc=pass "), result


# -- policies ------------------------------------------------------------------------------


def test_quarantine(plugin):
    ctx, verdict = run(plugin, "a@quarantine.test", SPF_FAIL)
    assert (verdict.action, verdict.reason) == ("quarantine", "dmarc")
    assert dmarc_result(verdict) == "dmarc=fail (p=quarantine sp=quarantine dis=quarantine) header.from=quarantine.test"
    assert ctx.transaction.notes["dmarc"] == {
        "result": "fail", "domain": "quarantine.test", "policy": "quarantine", "disposition": "quarantine"}


def test_p_none_continues_with_fail(plugin):
    _, verdict = run(plugin, "a@monitor.test", SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == "dmarc=fail (p=none sp=none dis=none) header.from=monitor.test"


def test_sp_applies_to_subdomains(plugin, server):
    _, verdict = run(plugin, "a@news.parent.test", SPF_FAIL)
    assert verdict.action == "reject"
    assert verdict.text == "DMARC policy of news.parent.test rejects this message"
    assert server.queries("_dmarc.news.parent.test", "TXT") == 1
    assert server.queries("_dmarc.parent.test", "TXT") == 1
    # The organizational domain itself gets p.
    _, verdict = run(plugin, "a@parent.test", SPF_FAIL)
    assert verdict.action == "continue"
    # A subdomain's own record is its policy (discovery stops there).
    _, verdict = run(plugin, "a@own.parent.test", SPF_FAIL)
    assert verdict.action == "quarantine"


def test_org_domain_fallback_under_a_multi_label_suffix(plugin, server):
    # co.uk is a public suffix: the organizational domain of news.example.co.uk is
    # example.co.uk, not co.uk (Debian's Public Suffix List).
    assert plugin.organizational_domain("news.example.co.uk") == "example.co.uk"
    _, verdict = run(plugin, "a@news.example.co.uk", SPF_FAIL)
    assert verdict.action == "reject"
    assert server.queries("_dmarc.news.example.co.uk", "TXT") == 1
    assert server.queries("_dmarc.example.co.uk", "TXT") == 1
    assert server.queries("_dmarc.co.uk", "TXT") == 0
    # Relaxed alignment across the organization.
    _, verdict = run(plugin, "a@news.example.co.uk", "dkim=pass header.d=example.co.uk header.s=s")
    assert verdict.action == "continue"
    _, verdict = run(plugin, "a@news.example.co.uk", "dkim=pass header.d=other.co.uk header.s=s")
    assert verdict.action == "reject"


def test_pct_zero_falls_back_to_the_next_policy(plugin):
    # p=reject; pct=0: no message is sampled, each gets quarantine (RFC 7489 §6.3).
    _, verdict = run(plugin, "a@sample.test", SPF_FAIL)
    assert verdict.action == "quarantine"
    assert dmarc_result(verdict) == "dmarc=fail (p=reject sp=reject dis=quarantine) header.from=sample.test"


def test_pct_samples_with_the_rng(plugin):
    plugin.rng = Fixed(0.49)  # 49 < 50: sampled, the policy applies
    assert run(plugin, "a@halfq.test", SPF_FAIL)[1].action == "quarantine"
    plugin.rng = Fixed(0.5)  # not sampled: quarantine -> none
    _, verdict = run(plugin, "a@halfq.test", SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict).startswith("dmarc=fail ")


def test_override(services):
    plugin = make_plugin(services, override={"reject.test": "none", "Monitor.test": "reject"})
    _, verdict = run(plugin, "a@reject.test", SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == "dmarc=fail (p=reject sp=reject dis=none) header.from=reject.test"
    assert run(plugin, "a@monitor.test", SPF_FAIL)[1].action == "reject"
    # Only the From domain named: others keep their published policy.
    assert run(plugin, "a@quarantine.test", SPF_FAIL)[1].action == "quarantine"


def test_enforce_false_only_tags(services):
    plugin = make_plugin(services, enforce=False)
    for domain in ("reject.test", "quarantine.test"):
        _, verdict = run(plugin, f"a@{domain}", SPF_FAIL)
        assert verdict.action == "continue"
        assert dmarc_result(verdict).startswith("dmarc=fail ")


# -- no policy, errors -------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["plain.test", "nowhere.test", "twice.test", "nopolicy.test"])
def test_no_policy_is_dmarc_none(plugin, domain):
    ctx, verdict = run(plugin, f"a@{domain}", SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == f"dmarc=none header.from={domain}"
    assert ctx.transaction.notes["dmarc"]["result"] == "none"


def test_invalid_p_with_rua_is_p_none(plugin):
    _, verdict = run(plugin, "a@rua.test", SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == "dmarc=fail (p=none sp=none dis=none) header.from=rua.test"


def test_other_txt_records_are_ignored(plugin):
    assert run(plugin, "a@other.test", SPF_FAIL)[1].action == "reject"


def test_several_records_stop_discovery(plugin, server):
    # RFC 7489 §6.6.3 step 5: no policy, and no fallback to the organizational domain
    # (whose sp=reject would otherwise apply).
    _, verdict = run(plugin, "a@dup.parent.test", SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == "dmarc=none header.from=dup.parent.test"
    assert server.queries("_dmarc.parent.test", "TXT") == 0


@pytest.mark.parametrize("from_field, why", [
    ("a@reject.test, b@quarantine.test", "several From domains"),
    ("undisclosed-recipients:;", "no From domain"),
])
def test_bad_from_is_permerror(plugin, server, from_field, why):
    ctx, verdict = run(plugin, from_field, SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == f"dmarc=permerror ({why})"
    assert ctx.transaction.notes["dmarc"]["result"] == "permerror"
    assert server.queries() == 0


def test_two_addresses_of_one_domain_are_one_domain(plugin):
    assert run(plugin, "a@reject.test, b@REJECT.test", SPF_FAIL)[1].action == "reject"


def test_bad_from_rejected_when_configured(services):
    plugin = make_plugin(services, reject_bad_from=True)
    _, verdict = run(plugin, "a@reject.test, b@quarantine.test")
    assert (verdict.action, verdict.code, verdict.esc) == ("reject", 550, "5.7.1")


def test_temperror_defers(plugin, server):
    server.fail("_dmarc.temp.test", "servfail")
    ctx, verdict = run(plugin, "a@temp.test", SPF_FAIL)
    assert (verdict.action, verdict.code, verdict.esc) == ("defer", 451, "4.4.3")
    assert dmarc_result(verdict) == "dmarc=temperror header.from=temp.test"
    assert ctx.transaction.notes["dmarc"]["result"] == "temperror"


def test_temperror_at_the_org_domain(services, server):
    server.fail("_dmarc.temp.test", "servfail")
    plugin = make_plugin(services, on_temperror="tag")
    _, verdict = run(plugin, "a@sub.temp.test", SPF_FAIL)
    assert verdict.action == "continue"
    assert dmarc_result(verdict) == "dmarc=temperror header.from=sub.temp.test"
    server.fail("_dmarc.temp.test", None)
    assert run(plugin, "a@sub.temp.test", SPF_FAIL)[1].action == "reject"


def test_outbound_is_not_checked(plugin, server):
    assert plugin.on_message(context("a@reject.test", [SPF_FAIL], user="alice")) is None
    assert plugin.on_message(context("a@reject.test", [SPF_FAIL], trusted=True)) is None
    assert server.queries() == 0


def test_policy_is_cached(plugin, server):
    run(plugin, "a@news.example.co.uk", SPF_FAIL)
    run(plugin, "b@news.example.co.uk", SPF_FAIL)
    assert server.queries("_dmarc.news.example.co.uk", "TXT") == 1
    assert server.queries("_dmarc.example.co.uk", "TXT") == 1


def test_after_the_spf_plugin(services):
    """The SPF plugin's own result, as the core passes it on, is what DMARC reads."""
    spf = SpfPlugin("spf")
    spf.configure(dict(SpfPlugin.options))
    spf.start(services)
    plugin = make_plugin(services)
    for ip, action in (("127.0.0.9", "continue"), ("192.0.2.9", "reject")):
        conn = api.Connection(ip=ip, helo="client.example")
        txn = api.Transaction(queue_id="q1", sender="bounce@spf.test")
        spf_verdict = spf.on_mail_from(api.Context("on_mail_from", connection=conn, transaction=txn))
        ctx = context("a@spf.test", spf_verdict.auth_results)
        assert plugin.on_message(ctx).action == action, ip


# -- the Public Suffix List --------------------------------------------------------------------


def write_psl(tmp_path):
    path = tmp_path / "psl.dat"
    path.write_text(
        "// ===BEGIN ICANN DOMAINS===\n"
        "uk\nco.uk\n\n"
        "// ck : https://www.iana.org/domains/root/db/ck.html\n"
        "*.ck\n!www.ck\n"
        "com\n"
        "公司.cn\ncn\n"
        "jp trailing words are ignored\n"
        "// ===END ICANN DOMAINS===\n"
        "// ===BEGIN PRIVATE DOMAINS===\n"
        "blogspot.com\n",
        encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("domain, org", [
    ("a.b.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),  # a public suffix itself
    ("a.b.uk", "b.uk"),
    ("x.foo.bar.ck", "foo.bar.ck"),  # *.ck: bar.ck is a public suffix
    ("a.www.ck", "www.ck"),  # !www.ck: www.ck is not
    ("x.y.blogspot.com", "y.blogspot.com"),  # the PRIVATE section counts
    ("x.example.com", "example.com"),
    ("a.b.unlisted", "b.unlisted"),  # the default rule "*"
    ("a.b.xn--55qx5d.cn", "b.xn--55qx5d.cn"),  # 公司.cn, compared as A-labels
    ("a.b.公司.cn", "b.xn--55qx5d.cn"),
    ("Mail.Example.COM.", "example.com"),
    ("a.b.jp", "b.jp"),
])
def test_public_suffix_rules(tmp_path, domain, org):
    assert PublicSuffixList.load(write_psl(tmp_path)).organizational_domain(domain) == org


def test_configured_psl_is_used(services, tmp_path):
    plugin = make_plugin(services, public_suffix_list=write_psl(tmp_path))
    assert plugin.organizational_domain("x.foo.bar.ck") == "foo.bar.ck"


def test_missing_psl_falls_back_to_two_labels(services, tmp_path):
    lines = []
    services = api.Services(hostname="mx.test", spool_dir=services.spool_dir, dns=services.dns,
                            log=lambda event, **fields: lines.append((event, fields)))
    path = str(tmp_path / "missing.dat")
    plugin = make_plugin(services, public_suffix_list=path)
    assert lines == [("psl_missing", {"plugin": "dmarc", "path": path, "fallback": "last two labels"})]
    assert plugin.organizational_domain("news.example.co.uk") == "co.uk"
    run(plugin, "a@reject.test", SPF_FAIL)
    assert [event for event, _ in lines] == ["psl_missing", "checked"]  # logged once


@pytest.mark.skipif(not os.path.exists(PSL_PATH), reason="Debian's publicsuffix package is not installed")
def test_debian_psl_wildcards_and_exceptions():
    psl = PublicSuffixList.load(PSL_PATH)
    assert psl.organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert psl.organizational_domain("a.www.ck") == "www.ck"
    assert psl.organizational_domain("a.b.c.ck") == "b.c.ck"


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, policy", [
    ("v=DMARC1; p=reject", Policy("reject", "reject")),
    ("v=DMARC1;p=Quarantine;sp=none;adkim=s;aspf=s;pct=20", Policy("quarantine", "none", "s", "s", 20)),
    ("v=DMARC1; p=none; adkim=x; pct=101; future=1", Policy("none", "none")),
    ("v=DMARC1; p=reject; sp=bogus", None),
    ("v=DMARC1; rua=mailto:a@example.com", Policy("none", "none")),
    ("v=DMARC1; rua=nonsense", None),
])
def test_parse_record(text, policy):
    assert parse_record(text) == policy


@pytest.mark.parametrize("text, expected", [
    ("dkim=pass header.d=example.com header.s=s1", ("dkim", "pass", {"header.d": "example.com", "header.s": "s1"})),
    ("dkim=fail (body hash (really) mismatch) header.d=example.com",
     ("dkim", "fail", {"header.d": "example.com"})),
    ("SPF=Pass smtp.mailfrom=\"a@example.com\"", ("spf", "pass", {"smtp.mailfrom": "a@example.com"})),
    ("dkim=none", ("dkim", "none", {})),
])
def test_parse_auth_result(text, expected):
    assert parse_auth_result(text) == expected


@pytest.mark.parametrize("options, problem", [
    ({"override": {"example.com": "bounce"}}, "override"),
    ({"on_temperror": "reject"}, "on_temperror"),
    ({"public_suffix_list": ""}, "public_suffix_list"),
])
def test_bad_options(options, problem):
    plugin = DmarcPlugin("dmarc")
    with pytest.raises(api.PluginError, match=f"^{problem}: "):
        plugin.configure({**DmarcPlugin.options, **options})


def test_a_discovered_policy_is_kept_while_its_dns_answers_are_valid(server, tmp_path):
    clock = Clock()
    resolver = Resolver([server.nameserver], timeout=2, clock=clock)
    plugin = make_plugin(api.Services(hostname="mx.test", spool_dir=str(tmp_path), dns=resolver,
                                      authserv_id="mx.test"))
    server.add("_dmarc.ttl.test", "TXT", "v=DMARC1; p=reject", ttl=60)
    assert run(plugin, "a@news.ttl.test", SPF_FAIL)[1].action == "reject"  # found at the org domain
    asked = server.queries()
    server.remove("_dmarc.ttl.test")
    server.add("_dmarc.ttl.test", "TXT", "v=DMARC1; p=none", ttl=60)
    clock.advance(59)
    assert run(plugin, "a@news.ttl.test", SPF_FAIL)[1].action == "reject"
    assert server.queries() == asked
    clock.advance(2)  # the org domain's answer (60 s) has expired: discovered again
    ctx, verdict = run(plugin, "a@news.ttl.test", SPF_FAIL)
    assert verdict.action == "continue" and ctx.transaction.notes["dmarc"]["policy"] == "none"
    assert server.queries("_dmarc.ttl.test", "TXT") == 2
