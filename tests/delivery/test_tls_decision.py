"""The TLS decision per host, with plain data: every policy against what a domain publishes."""

import pytest

from elemta.delivery.dane import DaneCheck, Tlsa
from elemta.delivery.mtasts import Policy
from elemta.delivery.router import Route
from elemta.delivery.tls_decision import Plan, make_plan

RECORD = Tlsa(3, 1, 1, b"\x01" * 32)
DANE = (DaneCheck((RECORD,), "mx.a.test", ("mx.a.test",)), "")  # usable records
UNUSABLE = (DaneCheck((), "mx.a.test", ("mx.a.test",)), "")  # records, none usable
BOGUS = (None, "DANE: the TLSA lookup failed (SERVFAIL); the host is not used")
ENFORCE = Policy("enforce", 86400, ("mx.a.test",))


def decide(policy, dane=None, sts=None, host="mx.a.test", mx=True, dane_off=""):
    tls = Plan(policy, mx, dane_off, sts, "a.test: no policy").host(host, dane)
    return "skip " + tls.status if tls.skip else f"{tls.policy}{' dane' if tls.dane else ''} {tls.source}".strip()


@pytest.mark.parametrize(("policy", "dane", "sts", "host", "expected"), [
    # dane: DANE first, then MTA-STS, then may (RFC 8461 §2, RFC 7672 §2.2)
    ("dane", DANE, ENFORCE, "mx.a.test", "verify dane DANE"),
    ("dane", DANE, ENFORCE, "mx.other.test", "verify dane DANE"),  # DANE wins over the policy's list
    ("dane", UNUSABLE, None, "mx.a.test", "encrypt DANE"),
    ("dane", BOGUS, ENFORCE, "mx.a.test", "skip 4.7.5"),
    ("dane", None, ENFORCE, "mx.a.test", "verify MTA-STS"),
    ("dane", None, ENFORCE, "mx.other.test", "skip 4.7.4"),
    ("dane", None, None, "mx.a.test", "may"),
    # dane-only: usable records or nothing
    ("dane-only", DANE, None, "mx.a.test", "verify dane DANE"),
    ("dane-only", UNUSABLE, None, "mx.a.test", "skip 4.7.5"),
    ("dane-only", None, ENFORCE, "mx.a.test", "skip 4.7.5"),
    ("dane-only", BOGUS, None, "mx.a.test", "skip 4.7.5"),
    # mta-sts: authenticated (DANE or the enforced policy) or nothing
    ("mta-sts", DANE, None, "mx.a.test", "verify dane DANE"),
    ("mta-sts", UNUSABLE, ENFORCE, "mx.a.test", "verify MTA-STS"),
    ("mta-sts", UNUSABLE, None, "mx.a.test", "skip 4.7.4"),
    ("mta-sts", None, ENFORCE, "mx.other.test", "skip 4.7.4"),
    ("mta-sts", None, None, "mx.a.test", "skip 4.7.4"),
    # fixed policies: whatever the domain publishes
    ("may", DANE, ENFORCE, "mx.other.test", "may"),
    ("none", DANE, ENFORCE, "mx.a.test", "none"),
    ("encrypt", None, ENFORCE, "mx.other.test", "encrypt"),
    ("verify", BOGUS, None, "mx.a.test", "verify"),
])
def test_each_policy_against_what_the_domain_publishes(policy, dane, sts, host, expected):
    assert decide(policy, dane, sts, host) == expected


def test_mta_sts_on_a_host_the_config_names_means_verify():
    assert decide("mta-sts", mx=False) == "verify"
    assert decide("dane", mx=False) == "may"


def test_skips_say_why_and_only_authenticated_tls_counts_as_authenticated():
    tls = Plan("dane-only", True, "the MX records of a.test are not authenticated (DNSSEC)").host("mx.a.test")
    assert tls.skip == "DANE required (dane-only): the MX records of a.test are not authenticated (DNSSEC)"
    tls = Plan("mta-sts", True, "", None, "a.test: policy in mode testing").host("mx.a.test")
    assert tls.skip == "MTA-STS required (mta-sts): a.test: policy in mode testing"
    plan = Plan("dane", True, "", ENFORCE)
    assert [plan.host("mx.a.test", d).authenticated for d in (DANE, UNUSABLE, None)] == [True, False, True]
    assert not Plan("dane").host("mx.a.test").authenticated
    assert not Plan("verify", True).host("mx.a.test").authenticated


class Lookups:
    """make_plan's questions, answered and counted."""

    def __init__(self, secure=True, policy=ENFORCE):
        self.asked = []
        self.secure, self.policy = secure, policy

    def mx_secure(self, domain):
        self.asked.append(("MX", domain))
        return self.secure

    def sts(self, domain):
        self.asked.append(("STS", domain))
        return self.policy, "cached"


MX = Route("smtp", ("mx.a.test",), 25, tls_policy="dane", mx=True)


def test_make_plan_asks_only_what_the_policy_needs():
    look = Lookups()
    assert make_plan(Route(**{**MX.__dict__, "tls_policy": "verify"}), "a.test", mx_secure=look.mx_secure,
                     sts=look.sts) == Plan("verify", True, domain="a.test")
    assert look.asked == []
    plan = make_plan(Route(**{**MX.__dict__, "tls_policy": "dane-only"}), "a.test", mx_secure=look.mx_secure,
                     sts=look.sts)
    assert (plan.asks_dane, plan.sts, look.asked) == (True, None, [("MX", "a.test")])
    look.asked.clear()
    plan = make_plan(Route("smtp", ("relay.test",), 587, tls_policy="dane"), "a.test", mx_secure=look.mx_secure,
                     sts=look.sts)
    assert (plan.asks_dane, plan.mx, look.asked) == (True, False, [])  # a configured host: no MX, no MTA-STS


def test_make_plan_says_why_dane_and_mta_sts_do_not_apply():
    plan = make_plan(MX, "a.test", mx_secure=Lookups(secure=False).mx_secure, sts=Lookups().sts)
    assert (plan.asks_dane, plan.dane_off) == (False, "the MX records of a.test are not authenticated (DNSSEC)")
    assert plan.sts == ENFORCE
    plan = make_plan(MX, "a.test", mx_secure=None, dane_off="delivery.dane is off", sts=None)
    assert (plan.dane_off, plan.sts_why) == ("DANE is not used: delivery.dane is off", "delivery.mta_sts is off")
    testing = Policy("testing", 60, ("mx.a.test",))
    plan = make_plan(MX, "a.test", mx_secure=None, sts=Lookups(policy=testing).sts)
    assert (plan.sts, plan.sts_why, plan.sts_testing) == (None, "a.test: policy in mode testing", testing)
    plan = make_plan(MX, "a.test", mx_secure=None, sts=Lookups(policy=None).sts)
    assert plan.sts_why == "a.test: cached"


def test_mode_testing_delivers_as_may_and_says_what_to_report():
    testing = Policy("testing", 86400, ("mx.a.test",))
    plan = Plan("dane", True, "", None, "a.test: policy in mode testing", domain="a.test", sts_testing=testing)
    named, other = plan.host("mx.a.test"), plan.host("mx.other.test")
    assert (named.policy, named.testing, named.result, named.authenticated) == ("verify", True, "", False)
    assert (other.policy, other.testing, other.result) == ("may", True, "validation-failure")
    assert named.pool_policy == "sts-testing" and named.label == " (MTA-STS testing)"
    assert plan.report_policy("mx.a.test", named).string[1] == "mode: testing"
    assert plan.host("mx.a.test", DANE).source == "DANE"  # DANE still first
    required = Plan("mta-sts", True, "", None, "a.test: policy in mode testing", sts_testing=testing)
    assert required.host("mx.a.test").skip  # testing is no policy to require
