"""delivery/dane_dns.py against a real validating resolver: unbound trusting a zone signed with
ldns-signzone and served by nsd, beside an unsigned zone and a zone with a forged record."""

import shutil

import pytest

from elemta.delivery.dane import Tlsa
from elemta.delivery.dane_dns import FAILED, INSECURE, SECURE, TlsaLookup
from tests.dnssec import DnssecTestbed

pytestmark = pytest.mark.skipif(not all(shutil.which(p) for p in ("nsd", "unbound", "ldns-signzone")),
                                reason="nsd, unbound and ldnsutils are not installed (run-tests.sh installs them)")

DIGEST = "a" * 64
FORGED = "b" * 64


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    zones = {
        "signed.test": ["mx IN A 127.0.0.1", f"_25._tcp.mx IN TLSA 3 1 1 {DIGEST}", "plain IN A 127.0.0.1"],
        "unsigned.test": ["mx IN A 127.0.0.1", f"_25._tcp.mx IN TLSA 3 1 1 {DIGEST}"],
        "forged.test": ["mx IN A 127.0.0.1", f"_25._tcp.mx IN TLSA 3 1 1 {DIGEST}"],
    }
    # The forged zone's TLSA record is changed after signing: its signature no longer matches.
    with DnssecTestbed(tmp_path_factory.mktemp("dnssec"), zones, signed={"signed.test", "forged.test"},
                       after_signing={"forged.test": (DIGEST, FORGED)}) as bed:
        yield bed


@pytest.fixture(scope="module")
def lookup(testbed):
    return TlsaLookup([testbed.nameserver], timeout=5)


def test_records_of_a_signed_zone_are_authenticated(lookup):
    answer = lookup.tlsa("mx.signed.test")
    assert answer.state == SECURE
    assert answer.records == (Tlsa(3, 1, 1, bytes.fromhex(DIGEST)),)


def test_no_records_in_a_signed_zone_is_an_authenticated_absence(lookup):
    assert lookup.tlsa("plain.signed.test").state == SECURE  # NODATA, authenticated
    assert lookup.tlsa("nowhere.signed.test").state == SECURE  # NXDOMAIN, authenticated
    assert lookup.tlsa("plain.signed.test").records == ()


def test_records_of_an_unsigned_zone_are_not_trusted(lookup):
    answer = lookup.tlsa("mx.unsigned.test")
    assert (answer.state, answer.records) == (INSECURE, ())


def test_a_forged_record_fails_and_is_never_used(lookup):
    answer = lookup.tlsa("mx.forged.test")
    assert (answer.state, answer.records) == (FAILED, ())


def test_an_unreachable_resolver_fails(testbed):
    answer = TlsaLookup(["127.0.0.1:9"], timeout=1).tlsa("mx.signed.test")
    assert answer.state == FAILED
