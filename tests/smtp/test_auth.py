"""The SASL exchanges of smtp/auth.py, driven with plain strings and an in-memory Verifier."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from elemta.errors import ElemtaError
from elemta.smtp.auth import (
    FAILURE_KINDS,
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USER_PROMPT,
    MAX_LINE,
    MECHANISMS,
    PLAINTEXT_MECHANISMS,
    Challenge,
    Exchange,
    Failure,
    Success,
    decode,
)

HOST = "mx.test.example"


class Users:
    """A Verifier holding passwords in a dict; `down` makes it answer as a broken backend."""

    def __init__(self, passwords: dict[str, str], cram: dict[str, bytes] | None = None, down: bool = False):
        self.passwords = passwords
        self.cram = cram or {}
        self.down = down
        self.checked: list[tuple[str, str]] = []

    def check_password(self, user, password):
        self.checked.append((user, password))
        if self.down:
            return None
        return self.passwords.get(user) == password

    def cram_md5_secret(self, user):
        if self.down:
            raise ElemtaError("/etc/elemta/passwd: Permission denied")
        return self.cram.get(user)


USERS = Users({"alice@example.com": "s3cret pass", "tim": "tanstaaftanstaaf", "zoë": "pässwörd"},
              {"tim": b"tanstaaftanstaaf", "alice@example.com": b"s3cret pass"})


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def exchange(mechanism, verifier=USERS, **kw):
    return Exchange(mechanism, verifier, hostname=HOST, **kw)


def test_the_interface_constants():
    assert MECHANISMS == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert PLAINTEXT_MECHANISMS == {"PLAIN", "LOGIN"}
    assert FAILURE_KINDS == ("bad_base64", "cancelled", "malformed", "invalid", "unavailable")


@pytest.mark.parametrize("name", ["DIGEST-MD5", "XOAUTH2", "", "PLAIN "])
def test_an_unknown_mechanism_is_a_value_error(name):
    with pytest.raises(ValueError):
        exchange(name)


def test_mechanism_names_are_case_insensitive():
    assert exchange("plain").mechanism == "PLAIN"
    assert exchange("cram-md5").mechanism == "CRAM-MD5"


# ---- PLAIN ------------------------------------------------------------------------------------


def test_plain_with_an_initial_response():
    ex = exchange("PLAIN")
    assert ex.start(b64("\0alice@example.com\0s3cret pass")) == Success("alice@example.com")
    assert ex.attempted_user == "alice@example.com" and ex.done


def test_plain_after_an_empty_challenge():
    ex = exchange("PLAIN")
    assert ex.start(None) == Challenge("")
    assert ex.attempted_user is None
    assert ex.step(b64("\0alice@example.com\0s3cret pass")) == Success("alice@example.com")


def test_plain_utf8_names_and_passwords():
    assert exchange("PLAIN").start(b64("\0zoë\0pässwörd")) == Success("zoë")
    assert exchange("PLAIN").start(b64("\0zoë\0passwort")).kind == "invalid"


def test_plain_authzid_equal_to_the_user_is_allowed():
    assert exchange("PLAIN").start(b64("alice@example.com\0alice@example.com\0s3cret pass")) == Success(
        "alice@example.com")


def test_plain_authzid_of_another_user_is_refused_even_with_the_right_password():
    verifier = Users(dict(USERS.passwords))
    ex = exchange("PLAIN", verifier)
    outcome = ex.start(b64("tim\0alice@example.com\0s3cret pass"))
    assert isinstance(outcome, Failure) and outcome.kind == "invalid"
    assert ex.attempted_user == "alice@example.com"
    assert verifier.checked == []


def test_plain_wrong_password_and_unknown_user_are_invalid():
    assert exchange("PLAIN").start(b64("\0alice@example.com\0wrong")).kind == "invalid"
    assert exchange("PLAIN").start(b64("\0mallory@example.com\0s3cret pass")).kind == "invalid"


@pytest.mark.parametrize("message", [
    b"alice@example.com\0s3cret pass",  # one NUL
    b"\0alice@example.com\0s3cret\0pass",  # a NUL inside the password
    b"\0alice@exa\0mple.com\0s3cret pass",  # ... inside the user name
    b"\0\0s3cret pass",  # empty authcid
    b"\0alice@example.com\0",  # empty password
    b"\0alice\xff@example.com\0s3cret pass",  # not UTF-8
    b"\0alice@example.com\0s3cret \xc3",  # a cut UTF-8 sequence
    b"",
])
def test_plain_malformed_messages(message):
    verifier = Users(dict(USERS.passwords))
    outcome = exchange("PLAIN", verifier).start(b64(message))
    assert isinstance(outcome, Failure) and outcome.kind == "malformed", outcome
    assert verifier.checked == []
    assert b"s3cret" not in outcome.reason.encode()


def test_plain_equals_sign_is_an_empty_initial_response():
    """RFC 4954 §4: "=" is an empty initial response, which is no valid PLAIN message."""
    outcome = exchange("PLAIN").start("=")
    assert outcome.kind == "malformed"


def test_plain_cancel_at_each_step():
    assert exchange("PLAIN").start("*") == Failure("cancelled", "cancelled by the client")
    ex = exchange("PLAIN")
    ex.start(None)
    assert ex.step("*").kind == "cancelled" and ex.done


def test_plain_bad_base64_initial_and_later():
    assert exchange("PLAIN").start("not base64!").kind == "bad_base64"
    ex = exchange("PLAIN")
    ex.start(None)
    assert ex.step("AGFsaWNl=").kind == "bad_base64"


def test_the_verifier_unavailable():
    down = Users(dict(USERS.passwords), down=True)
    assert exchange("PLAIN", down).start(b64("\0alice@example.com\0s3cret pass")) == Failure(
        "unavailable", "password backend unavailable")
    ex = exchange("LOGIN", down)
    ex.start(None)
    ex.step(b64("alice@example.com"))
    assert ex.step(b64("s3cret pass")).kind == "unavailable"


def test_a_verifier_that_raises_is_unavailable_without_the_password_in_the_reason():
    class Broken:
        def check_password(self, user, password):
            raise OSError(5, "Input/output error")

        def cram_md5_secret(self, user):
            raise OSError(13, "Permission denied")

    outcome = exchange("PLAIN", Broken()).start(b64("\0alice@example.com\0s3cret pass"))
    assert outcome.kind == "unavailable" and "Input/output error" in outcome.reason
    assert "s3cret" not in outcome.reason


# ---- LOGIN ------------------------------------------------------------------------------------


def test_login_prompts_are_username_and_password():
    assert base64.b64decode(LOGIN_USER_PROMPT) == b"Username:"
    assert base64.b64decode(LOGIN_PASSWORD_PROMPT) == b"Password:"


def test_login_in_two_steps():
    ex = exchange("LOGIN")
    assert ex.start(None) == Challenge(LOGIN_USER_PROMPT)
    assert ex.step(b64("alice@example.com")) == Challenge(LOGIN_PASSWORD_PROMPT)
    assert ex.attempted_user == "alice@example.com" and not ex.done
    assert ex.step(b64("s3cret pass")) == Success("alice@example.com")


def test_login_with_the_user_name_as_initial_response():
    ex = exchange("LOGIN")
    assert ex.start(b64("alice@example.com")) == Challenge(LOGIN_PASSWORD_PROMPT)
    assert ex.step(b64("wrong")) == Failure("invalid", "wrong user name or password")
    assert ex.attempted_user == "alice@example.com"


def test_login_empty_or_undecodable_fields_are_malformed():
    assert exchange("LOGIN").start("=").kind == "malformed"
    ex = exchange("LOGIN")
    ex.start(None)
    assert ex.step("").kind == "malformed"  # an empty line is an empty response
    ex = exchange("LOGIN")
    ex.start(None)
    ex.step(b64("alice@example.com"))
    assert ex.step("").kind == "malformed"
    ex = exchange("LOGIN")
    ex.start(None)
    assert ex.step(b64(b"\xffalice")).kind == "malformed"
    ex = exchange("LOGIN")
    ex.start(b64("alice@example.com"))
    assert ex.step(b64(b"s3cret\xfe")).kind == "malformed"


def test_login_cancel_at_each_step():
    assert exchange("LOGIN").start("*").kind == "cancelled"
    ex = exchange("LOGIN")
    ex.start(None)
    assert ex.step("*").kind == "cancelled"
    ex = exchange("LOGIN")
    ex.start(None)
    ex.step(b64("alice@example.com"))
    assert ex.step("*").kind == "cancelled"
    assert ex.attempted_user == "alice@example.com"


def test_login_bad_base64_at_each_step():
    assert exchange("LOGIN").start("YWxpY2U").kind == "bad_base64"  # padding missing
    ex = exchange("LOGIN")
    ex.start(None)
    ex.step(b64("alice@example.com"))
    assert ex.step("czNjcmV0 IHBhc3M=").kind == "bad_base64"


# ---- CRAM-MD5 ---------------------------------------------------------------------------------


def test_cram_md5_the_example_of_rfc_2195():
    """RFC 2195 §2: challenge <1896.697170952@postoffice.reston.mci.net>, user tim, secret
    tanstaaftanstaaf, response 'tim b913a602c7eda7a495b4e6e7334d3890'."""
    ex = Exchange("CRAM-MD5", USERS, hostname="postoffice.reston.mci.net", nonce=lambda: "1896.697170952")
    challenge = ex.start(None)
    assert challenge == Challenge("PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+")
    assert ex.step("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw") == Success("tim")
    assert ex.attempted_user == "tim"


def cram_response(ex: Exchange, user: str, secret: bytes) -> str:
    challenge = base64.b64decode(ex.start(None).text)
    return b64(f"{user} {hmac.new(secret, challenge, hashlib.md5).hexdigest()}")


def test_cram_md5_challenge_is_fresh_and_names_the_host():
    first = base64.b64decode(exchange("CRAM-MD5").start(None).text).decode()
    second = base64.b64decode(exchange("CRAM-MD5").start(None).text).decode()
    assert first != second
    assert first.startswith("<") and first.endswith(f"@{HOST}>")
    random, _, timestamp = first[1 : -len(HOST) - 2].partition(".")
    assert random.isdigit() and timestamp.isdigit()


def test_cram_md5_success_and_failures():
    ex = exchange("CRAM-MD5")
    assert ex.step(cram_response(ex, "alice@example.com", b"s3cret pass")) == Success("alice@example.com")
    ex = exchange("CRAM-MD5")
    assert ex.step(cram_response(ex, "alice@example.com", b"wrong")).kind == "invalid"
    ex = exchange("CRAM-MD5")  # zoë has a password but no CRAM-MD5 secret
    assert ex.step(cram_response(ex, "zoë", "pässwörd".encode())) == Failure(
        "invalid", "CRAM-MD5: no secret for user")
    ex = exchange("CRAM-MD5")
    assert ex.step(cram_response(ex, "nobody", b"")).kind == "invalid"


def test_cram_md5_digest_in_upper_case_is_taken():
    ex = exchange("CRAM-MD5")
    user, digest = base64.b64decode(cram_response(ex, "tim", b"tanstaaftanstaaf")).decode().split()
    assert ex.step(b64(f"{user} {digest.upper()}")) == Success("tim")


def test_cram_md5_answers_for_the_challenge_it_sent():
    """A response computed for another challenge (a replayed one) fails."""
    old = exchange("CRAM-MD5")
    replayed = cram_response(old, "tim", b"tanstaaftanstaaf")
    ex = exchange("CRAM-MD5")
    ex.start(None)
    assert ex.step(replayed).kind == "invalid"


@pytest.mark.parametrize("response", [
    "tim",  # no digest
    "tim b913a602c7eda7a495b4e6e7334d389",  # 31 digits
    "tim b913a602c7eda7a495b4e6e7334d3890a",  # 33
    "tim g913a602c7eda7a495b4e6e7334d3890",  # not hex
    " b913a602c7eda7a495b4e6e7334d3890",  # no user
    "",
])
def test_cram_md5_malformed_responses(response):
    ex = exchange("CRAM-MD5")
    ex.start(None)
    assert ex.step(b64(response)).kind == "malformed"


def test_cram_md5_takes_no_initial_response():
    """RFC 4954 §4: the server speaks first in CRAM-MD5; an initial response gets 501."""
    assert exchange("CRAM-MD5").start(b64("tim b913a602c7eda7a495b4e6e7334d3890")).kind == "malformed"
    assert exchange("CRAM-MD5").start("=").kind == "malformed"


def test_cram_md5_cancel_bad_base64_and_backend_down():
    ex = exchange("CRAM-MD5")
    ex.start(None)
    assert ex.step("*").kind == "cancelled"
    ex = exchange("CRAM-MD5")
    ex.start(None)
    assert ex.step("dGlt=").kind == "bad_base64"
    ex = exchange("CRAM-MD5", Users({}, down=True))
    outcome = ex.step(cram_response(ex, "tim", b"tanstaaftanstaaf"))
    assert outcome.kind == "unavailable" and "Permission denied" in outcome.reason


# ---- base64 and lines -------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "kind"), [
    ("QQ=", "bad_base64"),  # padding short
    ("QQ", "bad_base64"),  # padding missing
    ("Q", "bad_base64"),
    ("QQ==QQ==", "bad_base64"),  # data after the padding
    ("QR==", "bad_base64"),  # bits set after the last octet: not what an encoder writes
    ("QQ ==", "bad_base64"),
    ("QQ==\r", "bad_base64"),
    ("QUJD-A==", "bad_base64"),  # the URL alphabet
    ("QUJDé", "bad_base64"),
    ("   ", "malformed"),  # white space only
    ("\t", "malformed"),
])
def test_strict_base64(line, kind):
    assert decode(line).kind == kind
    ex = exchange("LOGIN")
    ex.start(None)
    assert ex.step(line).kind == kind


def test_base64_that_is_fine():
    assert decode("") == b""
    assert decode("QQ==") == b"A"
    assert decode("QUJD") == b"ABC"


def test_a_line_over_the_limit_is_malformed_without_decoding():
    """RFC 4954 §4: AUTH lines are at most 12288 octets."""
    ex = exchange("LOGIN")
    ex.start(None)
    longest = b64("a" * (MAX_LINE // 4 * 3))
    assert len(longest) == MAX_LINE
    assert ex.step(longest) == Challenge(LOGIN_PASSWORD_PROMPT)
    ex = exchange("LOGIN")
    assert ex.start(longest + "QUJD").kind == "malformed"
    ex = exchange("PLAIN")
    ex.start(None)
    assert ex.step("A" * (MAX_LINE + 1)).reason.endswith("longer than 12288 octets")


# ---- use -------------------------------------------------------------------------------------


def test_an_exchange_is_used_once():
    ex = exchange("PLAIN")
    ex.start(b64("\0alice@example.com\0s3cret pass"))
    with pytest.raises(RuntimeError):
        ex.step(b64("\0alice@example.com\0s3cret pass"))
    with pytest.raises(RuntimeError):
        ex.start(None)
    with pytest.raises(RuntimeError):
        exchange("PLAIN").step("*")  # before start()


def test_no_failure_reason_holds_the_password():
    password = "hunter2-the-password"
    verifier = Users({"alice": password})
    cases = [("PLAIN", b64(f"bob\0alice\0{password}")), ("PLAIN", b64(f"\0alice\0{password}x")),
             ("PLAIN", b64(f"\0alice\0{password}\0")), ("LOGIN", b64(f"{password}\xff"))]
    for mechanism, line in cases:
        outcome = exchange(mechanism, verifier).start(line)
        assert isinstance(outcome, Failure | Challenge)
        if isinstance(outcome, Failure):
            assert password not in outcome.reason
