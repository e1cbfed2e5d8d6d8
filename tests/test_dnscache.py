"""elemta.dnscache: the TXT and A lookups the plugins use, against a real DNS server."""

from __future__ import annotations

import pytest

from elemta.dnscache import DnsError, Resolver, name_of
from tests.dnsserver import DnsServer


@pytest.fixture(scope="module")
def server():
    with DnsServer({
        "spf.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all", 300), ("TXT", "other", 300)],
        "long.test": [("TXT", ["v=DKIM1; k=rsa; p=AAAA", "BBBB"], 300)],
        "2.0.0.127.bl.test": [("A", "127.0.0.2", 300)],
    }) as dns_server:
        yield dns_server


@pytest.fixture()
def resolver(server):
    return Resolver([server.nameserver], timeout=2)


def test_txt_records_come_back_whole(resolver):
    assert sorted(resolver.txt("spf.test")) == ["other", "v=spf1 ip4:127.0.0.1 -all"]


def test_a_txt_record_of_several_strings_is_joined_without_spaces(resolver):
    assert resolver.txt("long.test") == ["v=DKIM1; k=rsa; p=AAAABBBB"]


def test_missing_names_give_empty_lists(resolver):
    assert resolver.txt("nothing.test") == []
    assert resolver.a("nothing.bl.test") == []


def test_dnsbl_style_names_resolve_and_are_cached(server, resolver):
    assert resolver.a("2.0.0.127.bl.test.") == ["127.0.0.2"]
    assert resolver.a("2.0.0.127.bl.test") == ["127.0.0.2"]
    assert server.queries("2.0.0.127.bl.test", "A") == 1


def test_a_failed_lookup_is_transient(server, resolver):
    server.fail("broken.test", "servfail")
    with pytest.raises(DnsError) as caught:
        resolver.txt("broken.test")
    assert not caught.value.permanent


@pytest.mark.parametrize("bad", ["", "a..b", "x" * 64 + ".test", "."])
def test_names_that_are_not_names_are_refused(bad):
    with pytest.raises(DnsError):
        name_of(bad)


def test_underscore_labels_are_names():
    assert name_of("_dmarc.Example.TEST.") == "_dmarc.example.test"
