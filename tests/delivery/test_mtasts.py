"""delivery/mtasts.py: MTA-STS records, policies, MX matching and the cache's rules (RFC 8461)."""

import pytest

from elemta.delivery import mtasts
from elemta.delivery.mtasts import Cached, Policy, PolicyError, Record

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.backup.example.net\r\nmax_age: 604800\r\n"


@pytest.mark.parametrize("texts, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc ; ext_1=x-y "], "abc"),
    (["other text", "v=STSv1; id=abc"], "abc"),  # §3.1: other TXT records are discarded
])
def test_a_record_gives_its_id(texts, expected):
    assert mtasts.parse_record(texts) == Record(expected)


@pytest.mark.parametrize("texts", [
    [],
    ["v=spf1 -all"],
    ["v=STSv1; id=a", "v=STSv1; id=b"],  # §3.1: not exactly one record: no policy
    ["v=STSv1;"],  # no id
    ["v=STSv1; id="],
    ["v=STSv1; id=" + "a" * 33],  # at most 32 characters
    ["v=STSv1; id=a-b"],  # letters and digits only
    ["v=STSv1; id=a; id=b"],
    ["v=STSv1; id=a; bad"],
    ["v=STSv1; id=a; x=a=b"],
    ["v=STSv2; id=a"],
    ["V=STSv1; id=a"],  # the version is case-sensitive (%s in the ABNF)
])
def test_anything_else_is_no_record(texts):
    assert mtasts.parse_record(texts) is None


def test_a_policy_is_read_with_its_patterns_lower_cased():
    policy = mtasts.parse_policy(GOOD.replace(b"mail.example.com", b"Mail.Example.COM."))
    assert policy == Policy("enforce", 604800, ("mail.example.com", "*.backup.example.net"))


def test_lf_endings_blank_lines_spaces_and_unknown_keys_are_taken():
    body = b"version:STSv1\n\nmode :  testing  \nfuture_key: whatever it says\nmx: mx.example.org\nmax_age: 0"
    assert mtasts.parse_policy(body) == Policy("testing", 0, ("mx.example.org",))


def test_mode_none_needs_no_mx():
    assert mtasts.parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n") == Policy("none", 86400, ())


@pytest.mark.parametrize("body, why", [
    (GOOD.replace(b"STSv1", b"STSv2"), "unknown policy version"),
    (GOOD.replace(b"enforce", b"strict"), "unknown mode"),
    (GOOD.replace(b"604800", b"31557601"), "max_age"),
    (GOOD.replace(b"604800", b"-1"), "max_age"),
    (GOOD.replace(b"604800", b"1e3"), "max_age"),
    (GOOD.replace(b"max_age: 604800\r\n", b""), "without max_age"),
    (GOOD + b"mode: testing\r\n", "mode given twice"),
    (b"version: STSv1\nmode: enforce\nmax_age: 60\n", "without mx"),
    (GOOD.replace(b"mail.example.com", b"*.*.example.com"), "not an mx pattern"),
    (GOOD.replace(b"mail.example.com", b"localhost"), "not an mx pattern"),
    (GOOD.replace(b"mail.example.com", b"-bad.example.com"), "not an mx pattern"),
    (GOOD + b"this is not a field\r\n", "not a policy line"),
    (GOOD + "mx: mx.exämple.com\n".encode(), "not ASCII"),
    (GOOD + b"x: " + b"y" * mtasts.MAX_POLICY_SIZE, "larger than"),
])
def test_an_invalid_policy_is_refused_with_the_reason(body, why):
    with pytest.raises(PolicyError, match=why):
        mtasts.parse_policy(body)


@pytest.mark.parametrize("host, allowed", [
    ("mail.example.com", True),
    ("MAIL.example.com.", True),
    ("mx1.backup.example.net", True),
    ("backup.example.net", False),  # the wildcard is one label, never none
    ("a.mx1.backup.example.net", False),  # ... and never two
    ("evil-mail.example.com", False),
    ("mail.example.com.evil.test", False),
])
def test_mx_hosts_match_the_patterns_as_section_4_1_says(host, allowed):
    assert mtasts.parse_policy(GOOD).allows(host) is allowed


POLICY = Policy("enforce", 1000, ("mx.example.com",))


def test_a_policy_is_fetched_when_none_is_cached_or_the_id_changed_or_it_is_old():
    cached = Cached(POLICY, "one", fetched=10_000.0)
    assert mtasts.needs_fetch(None, Record("one"), 10_100.0)
    assert not mtasts.needs_fetch(cached, Record("one"), 10_100.0)
    assert mtasts.needs_fetch(cached, Record("two"), 10_100.0)  # the domain changed its policy
    assert mtasts.needs_fetch(cached, Record("one"), 10_500.0)  # half its age: refreshed early
    assert mtasts.needs_fetch(cached, Record("one"), 11_000.0)  # expired


def test_without_a_record_the_cached_policy_applies_until_it_expires():
    cached = Cached(POLICY, "one", fetched=10_000.0)
    assert not mtasts.needs_fetch(cached, None, 10_900.0)
    assert mtasts.applicable(cached, 10_999.0) == POLICY  # an attacker hid the record: still enforced
    assert mtasts.applicable(cached, 11_000.0) is None
    assert mtasts.applicable(None, 10_000.0) is None


def test_a_policy_in_mode_none_applies_nothing():
    assert mtasts.applicable(Cached(Policy("none", 1000, ()), "x", 0.0), 10.0) is None


def test_the_policy_is_always_at_the_well_known_url_of_the_mta_sts_host():
    assert mtasts.policy_url("Example.COM.") == "https://mta-sts.example.com/.well-known/mta-sts.txt"
