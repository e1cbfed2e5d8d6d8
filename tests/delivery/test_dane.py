"""delivery/dane.py: which TLSA records SMTP may use; dane_dns.trusted(): whose AD bit counts."""

import pytest

from elemta.delivery import dane
from elemta.delivery.dane import Tlsa
from elemta.delivery.dane_dns import trusted


@pytest.mark.parametrize("record, usable", [
    (Tlsa(3, 1, 1, b"\0" * 32), True),
    (Tlsa(2, 0, 2, b"\0" * 64), True),
    (Tlsa(3, 0, 0, b"DER"), True),
    (Tlsa(1, 1, 1, b"\0" * 32), False),  # PKIX-EE: RFC 7672 §3.1.3, not for SMTP
    (Tlsa(0, 0, 1, b"\0" * 32), False),  # PKIX-TA likewise
    (Tlsa(3, 1, 1, b"\0" * 31), False),  # a SHA-256 digest of the wrong size
    (Tlsa(3, 1, 2, b"\0" * 32), False),  # a SHA-512 digest of the wrong size
    (Tlsa(3, 2, 1, b"\0" * 32), False),  # no such selector
    (Tlsa(3, 1, 3, b"\0" * 32), False),  # no such matching type
    (Tlsa(3, 1, 0, b""), False),
])
def test_only_dane_ta_and_dane_ee_with_known_selector_and_digest_are_usable(record, usable):
    assert record.usable is usable
    assert dane.usable([record]) == ([record] if usable else [])


def test_a_record_is_written_as_in_a_zone_file_and_found_under_the_port_and_host():
    assert str(Tlsa(3, 1, 1, bytes.fromhex("abcd"))) == "3 1 1 abcd"
    assert dane.tlsa_name("MX.Example.COM.") == "_25._tcp.mx.example.com"


@pytest.mark.parametrize("resolvers, expected", [
    (["127.0.0.1"], True),
    (["127.0.0.53:53", "[::1]:5353"], True),
    (["192.0.2.1"], False),
    (["127.0.0.1", "192.0.2.1"], False),  # one remote resolver is enough to lose the trust
])
def test_only_resolvers_on_this_host_are_trusted_with_the_ad_bit(resolvers, expected):
    assert trusted(resolvers) is expected
