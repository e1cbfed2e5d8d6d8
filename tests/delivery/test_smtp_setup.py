"""delivery/smtp_setup.py with plain values: greeting, EHLO, STARTTLS and AUTH decisions."""

import base64

import pytest

from elemta.delivery import smtp_setup as setup
from elemta.delivery.smtp_transaction import Failure
from elemta.reply import Reply

OFFERS_TLS = {"STARTTLS": "", "PIPELINING": ""}


def test_only_220_is_a_greeting():
    assert setup.greeting(Reply(220, "", "mx ESMTP")) is None
    refused = Reply(554, "5.3.2", "not here")
    assert setup.greeting(refused) == Failure("greeting", "greeting refused", refused)


@pytest.mark.parametrize(("code", "lmtp", "next_step"), [
    (250, False, "ok"), (250, True, "ok"),
    (502, False, "helo"), (500, False, "helo"),  # RFC 5321 §3.2: a server without EHLO
    (502, True, None),  # RFC 2033 §4.1: no HELO fallback in LMTP
    (421, False, None),
])
def test_after_ehlo(code, lmtp, next_step):
    got = setup.after_ehlo(Reply(code, "", "x"), "EHLO", lmtp)
    assert got == next_step if next_step else isinstance(got, Failure) and got.stage == "ehlo"


@pytest.mark.parametrize(("policy", "extensions", "step"), [
    ("none", OFFERS_TLS, "plain"),
    ("may", OFFERS_TLS, "starttls"), ("may", {}, "plain"),
    ("encrypt", OFFERS_TLS, "starttls"), ("verify", OFFERS_TLS, "starttls"),
])
def test_before_starttls(policy, extensions, step):
    assert setup.before_starttls(policy, extensions) == step


@pytest.mark.parametrize("policy", ["encrypt", "verify"])
def test_a_required_tls_not_offered_is_a_transient_failure(policy):
    got = setup.before_starttls(policy, {})
    assert (got.stage, got.enhanced, got.permanent) == ("tls-policy", "4.7.4", False)


def test_after_starttls():
    ready, no = Reply(220, "2.0.0", "go ahead"), Reply(454, "4.7.0", "not now")
    assert setup.after_starttls("may", ready, early_data=False) == "handshake"
    assert setup.after_starttls("may", no, early_data=False) == "plain"
    refused = setup.after_starttls("encrypt", no, early_data=False)
    assert (refused.stage, refused.enhanced, refused.permanent) == ("starttls", "4.7.4", False)
    # RFC 3207 §4.2: bytes before the handshake (response injection) are never trusted.
    injected = setup.after_starttls("may", ready, early_data=True)
    assert (injected.reason, injected.enhanced) == ("data sent before the TLS handshake", "4.5.0")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auth_plain_sends_its_initial_response():
    login = setup.Login("u@example.org", "pässword", {"AUTH": "LOGIN PLAIN"}, tls=True)
    assert login.first() == "AUTH PLAIN " + b64("\0u@example.org\0pässword")
    assert login.next(Reply(235, "2.7.0", "ok")) == "done"


def test_auth_login_answers_two_prompts():
    login = setup.Login("u", "p", {"AUTH": "login"}, tls=True)
    prompt = Reply(334, "", "VXNlcm5hbWU6")
    assert [login.first(), login.next(prompt), login.next(prompt)] == ["AUTH LOGIN", b64("u"), b64("p")]
    assert login.next(Reply(235, "2.7.0", "ok")) == "done"
    third = setup.Login("u", "p", {"AUTH": "LOGIN"}, tls=True)
    third.first(), third.next(prompt), third.next(prompt)
    assert isinstance(third.next(prompt), Failure)  # a third prompt is no login


def test_a_refused_login_waits_in_the_queue():
    login = setup.Login("u", "p", {"AUTH": "PLAIN"}, tls=True)
    login.first()
    got = login.next(Reply(535, "5.7.8", "bad credentials"))
    assert (got.stage, got.enhanced, got.permanent) == ("auth", "4.7.8", False)
    assert login.next(Reply(535, "", "no")).enhanced == "4.7.0"


def test_no_password_in_clear_text_and_none_without_a_known_mechanism():
    assert setup.Login("u", "p", {"AUTH": "PLAIN"}, tls=False).first().enhanced == "4.7.10"
    assert setup.Login("u", "p", {"AUTH": "CRAM-MD5"}, tls=True).first().reason == "no AUTH PLAIN or LOGIN offered"
