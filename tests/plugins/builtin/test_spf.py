"""The spf plugin against a real DNS server on loopback, through elemta's cached resolver."""

from __future__ import annotations

import re

import pytest

from elemta.dnscache import Resolver
from elemta.plugins import api
from elemta.plugins.builtin import spf as spf_module
from elemta.plugins.builtin.spf import SpfPlugin
from tests.dnsserver import DnsServer
from tests.support import Clock

CLIENT = "127.0.0.9"
ZONES = {
    "pass.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", 300)],
    "fail.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all", 300)],
    "explained.test": [("TXT", "v=spf1 -all exp=why.explained.test", 300)],
    "why.explained.test": [("TXT", "%{i} is not a server of %{d}", 300)],
    "soft.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 ~all", 300)],
    "neutral.test": [("TXT", "v=spf1 ?all", 300)],
    # A TXT record that is not SPF, so "none" is about the record and not the name.
    "none.test": [("TXT", "google-site-verification=abc", 300), ("A", "192.0.2.1", 300)],
    "twice.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", 300), ("TXT", "v=spf1 -all", 300)],
    "syntax.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 moo:bar -all", 300)],
    "void.test": [("TXT", "v=spf1 a:nx1.void.test a:nx2.void.test a:nx3.void.test -all", 300)],
    "temp.test": [("TXT", "v=spf1 +all", 300)],
    "include.test": [("TXT", "v=spf1 include:pass.test -all", 300)],
    "redirect.test": [("TXT", "v=spf1 redirect=pass.test", 300)],
    # Split in two strings: the record is their concatenation (RFC 7208 §3.3).
    "mx.test.example": [("TXT", ["v=spf1 mx ", "-all"], 300), ("MX", (10, "in.mx.test.example"), 300)],
    "in.mx.test.example": [("A", CLIENT, 300)],
    "helo.test": [("TXT", "v=spf1 a -all", 300), ("A", CLIENT, 300)],
    "v6.test": [("TXT", "v=spf1 a -all", 300), ("AAAA", "::1", 300)],
}


@pytest.fixture
def server():
    with DnsServer(ZONES) as server:
        yield server


@pytest.fixture
def resolver(server):
    return Resolver([server.nameserver], timeout=2)


@pytest.fixture
def services(resolver, tmp_path):
    return api.Services(hostname="mx.test", spool_dir=str(tmp_path), dns=resolver, authserv_id="mx.test")


def make_plugin(services, **options):
    plugin = SpfPlugin("spf")
    plugin.configure({**SpfPlugin.options, **options})
    plugin.start(services)
    return plugin


@pytest.fixture
def plugin(services):
    return make_plugin(services)


def context(sender, ip=CLIENT, helo="client.example", **conn):
    connection = api.Connection(ip=ip, helo=helo, **conn)
    return api.Context("on_mail_from", connection=connection,
                       transaction=api.Transaction(queue_id="q1", sender=sender))


def check(plugin, sender, **kwargs):
    ctx = context(sender, **kwargs)
    return ctx, plugin.on_mail_from(ctx)


def spf_result(verdict):
    (result,) = verdict.auth_results
    return result


def received_spf(verdict) -> tuple[str, str, dict[str, str]]:
    """Parse a Received-SPF value (RFC 7208 §9.1): result, comment, key=value pairs."""
    (name, value), = verdict.add_headers
    assert name == "Received-SPF"
    match = re.fullmatch(r"(\w+) \(([^()]*)\) (.*)", value)
    assert match, value
    pairs = {}
    for item in match.group(3).split(";"):
        key, _, val = item.strip().partition("=")
        pairs[key] = val[1:-1].replace('\\"', '"') if val.startswith('"') else val
    return match.group(1), match.group(2), pairs


# -- results ----------------------------------------------------------------------------


def test_pass(plugin):
    ctx, verdict = check(plugin, "alice@pass.test")
    assert verdict.action == "continue"
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=alice@pass.test"
    assert ctx.transaction.notes["spf"] == {"result": "pass", "domain": "pass.test"}


def test_fail_rejects_by_default(plugin):
    ctx, verdict = check(plugin, "bob@fail.test")
    assert (verdict.action, verdict.code, verdict.esc) == ("reject", 550, "5.7.23")
    assert verdict.text.startswith("SPF check failed: ")
    assert "fail.test" in verdict.text and CLIENT in verdict.text
    assert spf_result(verdict) == "spf=fail smtp.mailfrom=bob@fail.test"
    assert ctx.transaction.notes["spf"]["result"] == "fail"


def test_fail_uses_the_domains_explanation(plugin):
    _, verdict = check(plugin, "bob@explained.test")
    # exp= with macros expanded (RFC 7208 §6.2, §7).
    assert verdict.text == f"SPF check failed: {CLIENT} is not a server of explained.test"


def test_fail_tagged(services):
    plugin = make_plugin(services, on_fail="tag")
    _, verdict = check(plugin, "bob@fail.test")
    assert verdict.action == "continue"
    assert spf_result(verdict) == "spf=fail smtp.mailfrom=bob@fail.test"
    assert received_spf(verdict)[0] == "fail"


def test_softfail_tagged_by_default(plugin):
    _, verdict = check(plugin, "carol@soft.test")
    assert verdict.action == "continue"
    assert spf_result(verdict) == "spf=softfail smtp.mailfrom=carol@soft.test"


def test_softfail_rejected_when_configured(services):
    plugin = make_plugin(services, on_softfail="reject")
    _, verdict = check(plugin, "carol@soft.test")
    assert (verdict.action, verdict.code, verdict.esc) == ("reject", 550, "5.7.23")


def test_neutral(plugin):
    _, verdict = check(plugin, "dan@neutral.test")
    assert verdict.action == "continue"
    assert spf_result(verdict) == "spf=neutral smtp.mailfrom=dan@neutral.test"


@pytest.mark.parametrize("sender", ["erin@none.test", "erin@nowhere.test"])
def test_none_without_a_record(plugin, sender):
    ctx, verdict = check(plugin, sender)
    assert verdict.action == "continue"
    assert spf_result(verdict).startswith("spf=none ")
    assert ctx.transaction.notes["spf"]["result"] == "none"


def test_none_for_a_single_label_domain_without_a_query(plugin, server):
    _, verdict = check(plugin, "postmaster")
    assert spf_result(verdict).startswith("spf=none ")
    assert server.queries() == 0


@pytest.mark.parametrize("sender", ["x@twice.test", "x@syntax.test", "x@void.test"])
def test_permerror_tagged_by_default(plugin, sender):
    _, verdict = check(plugin, sender)
    assert verdict.action == "continue"
    assert spf_result(verdict) == f"spf=permerror smtp.mailfrom={sender}"
    result, _, pairs = received_spf(verdict)
    assert result == "permerror"
    assert pairs["problem"]


def test_void_lookup_limit(plugin, server):
    # RFC 7208 §4.6.4: more than two lookups with no answer is a permerror.  Our DNS
    # override counts them (pyspf's own count is in the query.dns() it replaces).
    _, verdict = check(plugin, "x@void.test")
    assert received_spf(verdict)[2]["problem"] == "Void lookup limit of 2 exceeded"
    assert [server.queries(f"nx{n}.void.test", "A") for n in (1, 2, 3)] == [1, 1, 1]
    # A cached void answer still counts as one.
    _, verdict = check(plugin, "x@void.test")
    assert spf_result(verdict) == "spf=permerror smtp.mailfrom=x@void.test"
    assert [server.queries(f"nx{n}.void.test", "A") for n in (1, 2, 3)] == [1, 1, 1]


def test_permerror_rejected_when_configured(services):
    plugin = make_plugin(services, on_permerror="reject")
    _, verdict = check(plugin, "x@twice.test")
    assert (verdict.action, verdict.code, verdict.esc) == ("reject", 550, "5.5.2")
    assert "twice.test" in verdict.text


def test_temperror_defers(plugin, server):
    server.fail("temp.test", "servfail")
    ctx, verdict = check(plugin, "x@temp.test")
    assert (verdict.action, verdict.code, verdict.esc) == ("defer", 451, "4.4.3")
    assert spf_result(verdict) == "spf=temperror smtp.mailfrom=x@temp.test"
    assert ctx.transaction.notes["spf"]["result"] == "temperror"


def test_temperror_tagged(services, server):
    server.fail("temp.test", "servfail")
    plugin = make_plugin(services, on_temperror="tag")
    _, verdict = check(plugin, "x@temp.test")
    assert verdict.action == "continue"
    assert spf_result(verdict) == "spf=temperror smtp.mailfrom=x@temp.test"
    # Once the server answers again, the failure was not cached.
    server.fail("temp.test", None)
    _, verdict = check(plugin, "x@temp.test")
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=x@temp.test"


def test_timeout_for_the_whole_evaluation(services):
    # A clock that jumps past the limit after the first lookup: the include's lookup is
    # then over time, which is a temperror (RFC 7208 §4.6.4).
    plugin = make_plugin(services, timeout=5, on_temperror="tag")
    ticks = iter([0.0, 1.0, 100.0, 200.0, 300.0])
    plugin.clock = lambda: next(ticks)
    _, verdict = check(plugin, "x@include.test")
    assert spf_result(verdict) == "spf=temperror smtp.mailfrom=x@include.test"


# -- mechanisms and modifiers --------------------------------------------------------------


def test_include(plugin, server):
    _, verdict = check(plugin, "x@include.test")
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=x@include.test"
    assert server.queries("pass.test", "TXT") == 1
    _, verdict = check(plugin, "x@include.test", ip="192.0.2.7")
    assert verdict.action == "reject"


def test_redirect(plugin):
    _, verdict = check(plugin, "x@redirect.test")
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=x@redirect.test"
    _, verdict = check(plugin, "x@redirect.test", ip="192.0.2.7")
    assert verdict.action == "reject"


def test_mx_mechanism_and_split_txt_strings(plugin, server):
    _, verdict = check(plugin, "x@mx.test.example")
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=x@mx.test.example"
    assert server.queries("in.mx.test.example", "A") == 1


def test_ipv6_client(plugin):
    _, verdict = check(plugin, "x@v6.test", ip="::1")
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=x@v6.test"
    _, verdict = check(plugin, "x@v6.test", ip="::2")
    assert verdict.action == "reject"


def test_null_sender_checks_the_helo(plugin):
    # RFC 7208 §2.4: the identity is postmaster@<HELO name>.
    ctx, verdict = check(plugin, "", helo="helo.test")
    assert spf_result(verdict) == "spf=pass smtp.helo=helo.test"
    assert ctx.transaction.notes["spf"] == {"result": "pass", "domain": "helo.test"}
    result, _, pairs = received_spf(verdict)
    assert (result, pairs["identity"], pairs["helo"]) == ("pass", "helo", "helo.test")
    _, verdict = check(plugin, "", helo="helo.test", ip="127.0.0.10")
    assert verdict.action == "reject"


def test_null_sender_with_an_address_literal_helo(plugin, server):
    _, verdict = check(plugin, "", helo="[127.0.0.9]")
    assert spf_result(verdict).startswith("spf=none smtp.helo=")
    assert server.queries() == 0


# -- header, skips, cache, options -------------------------------------------------------------


def test_received_spf_header(plugin):
    _, verdict = check(plugin, "alice@pass.test", helo="client.example")
    result, comment, pairs = received_spf(verdict)
    assert result == "pass"
    assert comment == f"mx.test: domain of pass.test designates {CLIENT} as permitted sender"
    assert pairs == {
        "client-ip": CLIENT,
        "envelope-from": "alice@pass.test",
        "helo": "client.example",
        "receiver": "mx.test",
        "identity": "mailfrom",
    }


def test_received_spf_quotes_what_is_no_dot_atom(plugin):
    _, verdict = check(plugin, '"a b"@pass.test')
    _, _, pairs = received_spf(verdict)
    assert pairs["envelope-from"] == '"a b"@pass.test'
    # The auth result keeps to the domain when the local-part would need quoting.
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=pass.test"


def test_outbound_is_not_checked(plugin, server):
    assert plugin.on_mail_from(context("x@fail.test", user="alice")) is None
    assert plugin.on_mail_from(context("x@fail.test", trusted=True)) is None
    assert plugin.on_mail_from(context("x@fail.test", ip="")) is None  # no IP client
    assert server.queries() == 0


def test_skip_networks(services, server):
    plugin = make_plugin(services, skip_networks=["127.0.0.0/24", "2001:db8::/32"])
    assert plugin.on_mail_from(context("x@fail.test")) is None
    assert plugin.on_mail_from(context("x@fail.test", ip="::ffff:127.0.0.5")) is None
    assert server.queries() == 0
    assert plugin.on_mail_from(context("x@fail.test", ip="127.0.1.1")).action == "reject"


def test_second_check_is_answered_from_the_cache(plugin, server):
    check(plugin, "alice@include.test")
    asked = server.queries()
    assert server.queries("include.test", "TXT") == 1 and server.queries("pass.test", "TXT") == 1
    _, verdict = check(plugin, "bob@include.test")
    assert spf_result(verdict) == "spf=pass smtp.mailfrom=bob@include.test"
    assert server.queries() == asked


def test_log_line(services):
    lines = []
    services = api.Services(hostname="mx.test", spool_dir=services.spool_dir, dns=services.dns,
                            log=lambda event, **fields: lines.append((event, fields)))
    plugin = make_plugin(services)
    check(plugin, "x@pass.test")
    assert lines == [("checked", {"plugin": "spf", "result": "pass", "domain": "pass.test",
                                  "identity": "mailfrom", "ip": CLIENT})]


@pytest.mark.parametrize("options, problem", [
    ({"on_fail": "bounce"}, "on_fail"),
    ({"on_softfail": "defer"}, "on_softfail"),
    ({"on_temperror": "reject"}, "on_temperror"),
    ({"on_permerror": "defer"}, "on_permerror"),
    ({"skip_networks": ["10.0.0.0/33"]}, "skip_networks"),
    ({"timeout": 0}, "timeout"),
])
def test_bad_options(options, problem):
    plugin = SpfPlugin("spf")
    with pytest.raises(api.PluginError, match=f"^{problem}: "):
        plugin.configure({**SpfPlugin.options, **options})


def test_needs_a_resolver(tmp_path):
    plugin = SpfPlugin("spf")
    plugin.configure(dict(SpfPlugin.options))
    with pytest.raises(api.PluginError):
        plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path)))


# -- the result cache --------------------------------------------------------------------


@pytest.fixture
def clocked(server, tmp_path):
    """A plugin whose resolver runs on a fake clock, and that clock."""
    clock = Clock()
    resolver = Resolver([server.nameserver], timeout=2, clock=clock)
    services = api.Services(hostname="mx.test", spool_dir=str(tmp_path), dns=resolver, authserv_id="mx.test")
    return make_plugin(services), clock


def test_a_result_is_reused_while_its_dns_answers_are_cached(clocked, server, monkeypatch):
    plugin, clock = clocked
    server.add("ttl.test", "TXT", "v=spf1 include:pass.test -all", ttl=60)
    assert spf_result(check(plugin, "a@ttl.test")[1]) == "spf=pass smtp.mailfrom=a@ttl.test"
    asked = server.queries()
    server.remove("ttl.test")
    server.add("ttl.test", "TXT", "v=spf1 -all", ttl=60)
    clock.advance(59)  # the answer (60 s) is still valid: the same result, no query, no evaluation
    evaluations = []
    monkeypatch.setattr(spf_module._Query, "check", lambda q: evaluations.append(q) or ("fail", 550, ""))
    assert spf_result(check(plugin, "a@ttl.test")[1]) == "spf=pass smtp.mailfrom=a@ttl.test"
    assert server.queries() == asked and evaluations == []
    monkeypatch.undo()
    # Another sender, client or HELO name is another evaluation (macros may use them).
    assert spf_result(check(plugin, "b@ttl.test")[1]) == "spf=pass smtp.mailfrom=b@ttl.test"
    clock.advance(2)  # past the TTL: asked again, and the new record decides
    ctx, verdict = check(plugin, "a@ttl.test")
    assert verdict.action == "reject" and ctx.transaction.notes["spf"]["result"] == "fail"
    assert server.queries("ttl.test", "TXT") == 2


def test_a_result_lasts_only_as_long_as_its_shortest_answer(clocked, server):
    plugin, clock = clocked
    server.add("short.test", "TXT", "v=spf1 include:shorter.test -all", ttl=300)
    server.add("shorter.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all", ttl=30)
    assert check(plugin, "a@short.test")[1].action == "continue"
    server.remove("shorter.test")
    server.add("shorter.test", "TXT", "v=spf1 -all", ttl=30)
    clock.advance(31)  # short.test is still cached, shorter.test is not
    ctx, _ = check(plugin, "a@short.test")
    assert ctx.transaction.notes["spf"]["result"] == "fail"
    assert server.queries("short.test", "TXT") == 1 and server.queries("shorter.test", "TXT") == 2


def test_a_temperror_is_not_reused(clocked, server):
    plugin, _clock = clocked
    server.fail("temp.test", "servfail")
    assert check(plugin, "x@temp.test")[0].transaction.notes["spf"]["result"] == "temperror"
    server.fail("temp.test", None)
    assert check(plugin, "x@temp.test")[0].transaction.notes["spf"]["result"] == "pass"
