"""elemta.delivery.dns against a real DNS server on 127.0.0.1 (tests.dnsserver)."""

from __future__ import annotations

import random

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from elemta.delivery.dns import DnsError, NotCached, Resolver, parse_nameserver
from tests.dnsserver import DnsServer

RECORDS = {
    "example.test": [("MX", (20, "mx2.example.test"), 300), ("MX", (10, "mx1.example.test"), 300),
                     ("MX", (30, "mx3.example.test"), 300)],
    "mx1.example.test": [("A", "127.0.0.1", 300), ("AAAA", "::1", 300)],
    "mx2.example.test": [("A", "127.0.0.2", 300)],
    "v6only.example.test": [("AAAA", "::1", 300)],
    "equal.test": [("MX", (10, "a.equal.test"), 300), ("MX", (10, "b.equal.test"), 300),
                   ("MX", (20, "c.equal.test"), 300)],
    "plain.test": [("A", "127.0.0.1", 300)],
    "nullmx.test": [("MX", (0, "."), 300)],
    "mixed.test": [("MX", (0, "."), 300), ("MX", (5, "192.0.2.1"), 300),
                   ("MX", (10, "mx1.example.test"), 300)],
    "bogus.test": [("MX", (0, "."), 300), ("MX", (5, "192.0.2.1"), 300)],
    "txt.test": [("TXT", "v=spf1 -all", 300)],
    "short.test": [("MX", (10, "mx1.example.test"), 300), ("MX", (20, "mx2.example.test"), 30)],
    "alias.test": [("CNAME", "example.test", 300)],
    # bücher.test
    "xn--bcher-kva.test": [("MX", (10, "mx.xn--bcher-kva.test"), 300)],
    "one.test": [("MX", (5, "mx2.example.test"), 300), ("MX", (7, "mx1.example.test"), 300)],
    "two.test": [("MX", (10, "MX1.example.test."), 300), ("MX", (10, "mx2.example.test"), 300)],
}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def server():
    with DnsServer(RECORDS) as srv:
        yield srv


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def resolver(server, clock):
    return Resolver([server.nameserver], timeout=5.0, clock=clock, rng=random.Random(7))


def error_of(call, *args) -> DnsError:
    with pytest.raises(DnsError) as info:
        call(*args)
    return info.value


# -- mx_hosts ---------------------------------------------------------------------


def test_mx_hosts_in_preference_order(resolver):
    assert resolver.mx_hosts("example.test") == [
        "mx1.example.test", "mx2.example.test", "mx3.example.test"]


def test_equal_preferences_come_in_random_order(resolver):
    orders = set()
    for _ in range(40):
        hosts = resolver.mx_hosts("equal.test")
        assert hosts[2] == "c.equal.test"  # a worse preference is never mixed in
        orders.add(tuple(hosts[:2]))
    assert orders == {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")}


def test_implicit_mx_when_domain_has_no_mx_but_an_address(resolver):
    assert resolver.mx_hosts("plain.test") == ["plain.test"]
    assert resolver.mx_hosts("v6only.example.test") == ["v6only.example.test"]


def test_no_mx_and_no_address_is_permanent(resolver):
    err = error_of(resolver.mx_hosts, "txt.test")
    assert (err.permanent, err.enhanced) == (True, "5.1.2")
    assert "txt.test" in err.text


def test_null_mx_is_permanent_5_1_10(resolver):
    err = error_of(resolver.mx_hosts, "nullmx.test")
    assert (err.permanent, err.enhanced) == (True, "5.1.10")
    assert "nullmx.test" in str(err)


def test_root_and_ip_literal_exchanges_are_skipped(resolver):
    assert resolver.mx_hosts("mixed.test") == ["mx1.example.test"]
    err = error_of(resolver.mx_hosts, "bogus.test")
    assert (err.permanent, err.enhanced) == (False, "4.4.4")


def test_nxdomain_is_permanent(resolver):
    err = error_of(resolver.mx_hosts, "nosuch.example.test")
    assert (err.permanent, err.enhanced) == (True, "5.1.2")
    assert "nosuch.example.test" in err.text


@pytest.mark.parametrize("how", ["servfail", "refused"])
def test_server_failure_is_transient(server, resolver, how):
    server.fail("example.test", how)
    err = error_of(resolver.mx_hosts, "example.test")
    assert (err.permanent, err.enhanced) == (False, "4.4.3")
    assert "example.test" in err.text


def test_timeout_is_transient(server, clock):
    server.fail("example.test", "timeout")
    resolver = Resolver([server.nameserver], timeout=0.5, clock=clock)
    err = error_of(resolver.mx_hosts, "example.test")
    assert (err.permanent, err.enhanced) == (False, "4.4.3")
    assert "timed out" in err.text
    assert server.queries("example.test", "MX") >= 1


def test_cname_is_followed(resolver):
    assert resolver.mx_hosts("alias.test")[0] == "mx1.example.test"


def test_idna_domain_is_asked_as_a_label(server, resolver):
    assert resolver.mx_hosts("Bücher.test") == ["mx.xn--bcher-kva.test"]
    assert resolver.mx_hosts("xn--bcher-kva.test.") == ["mx.xn--bcher-kva.test"]
    assert server.queries("xn--bcher-kva.test", "MX") == 1  # same cache entry


@pytest.mark.parametrize("domain", ["", ".", "a..test", "bad_domain!.test", "[127.0.0.1]"])
def test_malformed_domain_is_permanent_5_1_3(server, resolver, domain):
    err = error_of(resolver.mx_hosts, domain)
    assert (err.permanent, err.enhanced) == (True, "5.1.3")
    assert server.queries() == 0


# -- addresses ----------------------------------------------------------------------


def test_addresses_ipv4_first(resolver):
    assert resolver.addresses("mx1.example.test") == ["127.0.0.1", "::1"]
    assert resolver.addresses("mx2.example.test") == ["127.0.0.2"]
    assert resolver.addresses("v6only.example.test") == ["::1"]


def test_addresses_prefer_ipv6(server, clock):
    resolver = Resolver([server.nameserver], clock=clock, prefer_ipv6=True)
    assert resolver.addresses("mx1.example.test") == ["::1", "127.0.0.1"]


@pytest.mark.parametrize("host", ["mx3.example.test", "txt.test"])
def test_host_without_address_is_transient(resolver, host):
    err = error_of(resolver.addresses, host)
    assert (err.permanent, err.enhanced) == (False, "4.4.4")
    assert host in err.text


def test_address_lookup_failure_is_transient(server, resolver):
    server.fail("mx1.example.test", "servfail")
    err = error_of(resolver.addresses, "mx1.example.test")
    assert (err.permanent, err.enhanced) == (False, "4.4.3")


# -- destination --------------------------------------------------------------------


def test_destination_is_shared_by_domains_with_the_same_mx_hosts(resolver):
    key = resolver.destination("one.test")
    assert key == ("mx1.example.test", "mx2.example.test")
    assert resolver.destination("two.test") == key
    assert resolver.destination("example.test") != key
    assert resolver.destination("plain.test") == ("plain.test",)


def test_destination_errors_as_mx_hosts(resolver):
    assert error_of(resolver.destination, "nullmx.test").enhanced == "5.1.10"


# -- cache --------------------------------------------------------------------------


def test_second_lookup_is_answered_from_the_cache_until_the_ttl_expires(server, resolver, clock):
    resolver.mx_hosts("example.test")
    resolver.mx_hosts("example.test")
    assert server.queries("example.test", "MX") == 1
    assert resolver.stats() == {"hits": 1, "misses": 1, "entries": 1}
    clock.advance(299)
    resolver.mx_hosts("example.test")
    assert server.queries("example.test", "MX") == 1
    clock.advance(1)
    resolver.mx_hosts("example.test")
    assert server.queries("example.test", "MX") == 2


def test_cache_uses_the_smallest_ttl_of_the_rrset(server, resolver, clock):
    resolver.mx_hosts("short.test")
    clock.advance(29)
    resolver.mx_hosts("short.test")
    assert server.queries("short.test", "MX") == 1
    clock.advance(1)
    resolver.mx_hosts("short.test")
    assert server.queries("short.test", "MX") == 2


def test_nxdomain_is_cached_for_the_negative_ttl(server, resolver, clock):
    for _ in range(2):
        assert error_of(resolver.mx_hosts, "new.example.test").enhanced == "5.1.2"
    assert server.queries("new.example.test", "MX") == 1
    server.add("new.example.test", "MX", (10, "mx1.example.test"))
    clock.advance(59)
    assert error_of(resolver.mx_hosts, "new.example.test").enhanced == "5.1.2"
    clock.advance(1)  # the SOA's 60 s (RFC 2308 §5)
    assert resolver.mx_hosts("new.example.test") == ["mx1.example.test"]
    assert server.queries("new.example.test", "MX") == 2


def test_nodata_is_cached_for_the_negative_ttl(server, resolver, clock):
    assert resolver.mx_hosts("plain.test") == ["plain.test"]
    assert resolver.mx_hosts("plain.test") == ["plain.test"]
    assert server.queries("plain.test", "MX") == 1
    assert server.queries("plain.test", "A") == 1
    clock.advance(60)
    resolver.mx_hosts("plain.test")
    assert server.queries("plain.test", "MX") == 2
    assert server.queries("plain.test", "A") == 1  # positive answer, 300 s


def test_failures_are_not_cached(server, resolver):
    server.fail("example.test", "servfail")
    error_of(resolver.mx_hosts, "example.test")
    server.fail("example.test", None)
    assert resolver.mx_hosts("example.test")[0] == "mx1.example.test"
    assert resolver.stats()["entries"] == 1


def test_cache_is_bounded_and_evicts_the_least_recently_used(server, clock):
    resolver = Resolver([server.nameserver], clock=clock, max_entries=3)
    for domain in ("example.test", "equal.test", "short.test"):
        resolver.mx_hosts(domain)
    resolver.mx_hosts("example.test")  # now the most recently used
    resolver.mx_hosts("one.test")  # evicts equal.test
    assert resolver.stats()["entries"] == 3
    resolver.mx_hosts("example.test")
    assert server.queries("example.test", "MX") == 1
    resolver.mx_hosts("equal.test")
    assert server.queries("equal.test", "MX") == 2


def test_clear_empties_the_cache(server, resolver):
    resolver.mx_hosts("example.test")
    resolver.clear()
    assert resolver.stats()["entries"] == 0
    resolver.mx_hosts("example.test")
    assert server.queries("example.test", "MX") == 2


# -- nameserver configuration ---------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[2001:DB8::1]", ("2001:db8::1", 53)),
])
def test_parse_nameserver(text, expected):
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", [
    "", "localhost", "dns.example:53", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
    "127.0.0.1:x", "999.0.0.1", "[::1", "[::1]53", "[::1]:", "1.2.3.4:53:53",
])
def test_malformed_nameserver_is_a_value_error(text):
    with pytest.raises(ValueError, match="nameserver"):
        Resolver([text])


def test_one_address_with_two_ports_is_a_value_error():
    # dnspython 2.3 keeps one port per address (Resolver.nameserver_ports).
    with pytest.raises(ValueError, match="two ports"):
        Resolver(["127.0.0.1:5353", "127.0.0.1:5354"])


def test_several_nameservers_keep_their_ports():
    resolver = Resolver(["127.0.0.1:5353", "[::1]:5354", "192.0.2.1"])
    assert resolver._dns.nameservers == ["127.0.0.1", "::1", "192.0.2.1"]
    assert resolver._dns.nameserver_ports == {"127.0.0.1": 5353, "::1": 5354, "192.0.2.1": 53}
    assert resolver._dns.search == []


# -- the test server itself ------------------------------------------------------------


def ask(server, name, rdtype, *, tcp=False):
    query = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, server.address[0], port=server.address[1], timeout=5)


def test_server_tells_nxdomain_from_nodata(server):
    nx = ask(server, "nosuch.example.test", "A")
    nodata = ask(server, "mx2.example.test", "AAAA")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nodata.rcode() == dns.rcode.NOERROR
    for response in (nx, nodata):
        assert response.answer == []
        (soa,) = response.authority
        assert soa.rdtype == dns.rdatatype.SOA
        assert soa.name.to_text() == "example.test."
        assert soa[0].minimum == 60


def test_server_answers_over_tcp(server):
    response = ask(server, "mx1.example.test", "AAAA", tcp=True)
    assert [rd.address for rd in response.answer[0]] == ["::1"]
    assert server.queries("mx1.example.test", "aaaa") == 1


def test_server_records_change_while_running(server):
    server.add("late.test", "TXT", "hello", ttl=5)
    (rrset,) = ask(server, "late.test", "TXT").answer
    assert (rrset.ttl, rrset[0].strings) == (5, (b"hello",))
    server.remove("late.test")
    assert ask(server, "late.test", "TXT").rcode() == dns.rcode.NXDOMAIN
    server.fail("late.test", "refused")
    assert ask(server, "late.test", "TXT").rcode() == dns.rcode.REFUSED
    assert server.queries("late.test") == 3


def test_whether_an_answer_is_cached_is_known_without_asking(server, resolver, clock):
    """What the scheduler asks before it routes on its own thread and the attempt before it
    looks up a host on the loop: cached answers only, never a query."""
    assert not resolver.mx_hosts_cached("example.test") and not resolver.addresses_cached("mx1.example.test")
    with pytest.raises(NotCached):
        resolver.addresses("mx1.example.test", cached_only=True)
    assert server.queries("example.test", "MX") == 0 and server.queries("mx1.example.test", "A") == 0
    resolver.mx_hosts("example.test")
    resolver.addresses("mx1.example.test")
    counted = resolver.stats()
    assert resolver.mx_hosts_cached("example.test") and resolver.addresses_cached("mx1.example.test")
    assert resolver.stats() == counted  # a question about the cache is no hit and no miss
    assert resolver.addresses("mx1.example.test", cached_only=True) == ["127.0.0.1", "::1"]
    assert server.queries("mx1.example.test", "A") == 1
    # a domain without MX records needs its addresses for mx_hosts() too
    resolver.lookup("plain.test", dns.rdatatype.MX)
    assert not resolver.mx_hosts_cached("plain.test")
    resolver.mx_hosts("plain.test")
    assert resolver.mx_hosts_cached("plain.test")
    clock.advance(301)  # past the TTL
    assert not resolver.mx_hosts_cached("example.test") and not resolver.addresses_cached("mx1.example.test")
    assert resolver.mx_hosts_cached("bad..name")  # mx_hosts() fails at once, without DNS
