"""SMTP AUTH (RFC 4954): the SASL exchanges PLAIN, LOGIN and CRAM-MD5 as sans-IO step machines.

The session owns the AUTH command and the 334 continuation lines; an Exchange owns what they
carry.  It is given the initial response of `AUTH <mechanism> [<initial-response>]` through
start() and each later client line through step(), and answers with one of

  Challenge(text)  send "334 <text>" and pass the next line to step()
  Success(user)    235 2.7.0: the client is authenticated as user
  Failure(kind)    the exchange is over; kind says which reply (RFC 4954 §4, §6):
                     bad_base64   501 5.5.2  a line that is not base64
                     cancelled    501 5.0.0  the client sent "*"
                     malformed    501 5.5.2  base64, but not what the mechanism expects
                     invalid      535 5.7.8  wrong user name or password
                     unavailable  454 4.7.0  the password backend failed (try again later)

Nothing here touches a socket or a file: the credentials come from a Verifier, so every rule
is tested with plain strings.  Passwords never leave this module except to the Verifier; they
are not kept after the step that used them and never appear in a Failure's reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from elemta.config import AUTH_MECHANISMS
from elemta.errors import ElemtaError

MECHANISMS = AUTH_MECHANISMS  # the ones config/keys.py allows, each implemented below
# These send the password itself (base64 is no protection): offered only over TLS
# (RFC 4954 §4, RFC 4616 §6), or in dev mode.
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})

# RFC 4954 §4: an AUTH line, initial response included, may be 12288 octets long; a
# response longer than that is refused without decoding it.
MAX_LINE = 12288

# draft-murchison-sasl-login §2: the server's prompts, as every client expects them.
LOGIN_USER_PROMPT = base64.b64encode(b"Username:").decode("ascii")
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode("ascii")


class Verifier(Protocol):
    """Where the credentials are (elemta.passwords.PasswordFile is one).

    check_password: True or False, or None when the backend cannot answer (unreadable file).
    cram_md5_secret: the shared secret of RFC 2195 (the password's bytes), None if the user
    has none (or does not exist); it raises an ElemtaError (or OSError) when the backend
    cannot answer.
    """

    def check_password(self, user: str, password: str) -> bool | None: ...

    def cram_md5_secret(self, user: str) -> bytes | None: ...


@dataclass(frozen=True)
class Challenge:
    text: str  # base64, for the reply "334 <text>"; "" for an empty challenge


@dataclass(frozen=True)
class Success:
    user: str


@dataclass(frozen=True)
class Failure:
    kind: str  # bad_base64, cancelled, malformed, invalid, unavailable
    reason: str = ""  # for the log: what was wrong; never a password


Step = Challenge | Success | Failure

FAILURE_KINDS = ("bad_base64", "cancelled", "malformed", "invalid", "unavailable")


def default_nonce() -> str:
    """The "random.timestamp" part of a CRAM-MD5 challenge (RFC 2195 §2): unpredictable, so a
    recorded response is worth nothing on the next connection."""
    return f"{secrets.randbelow(10**15)}.{time.time_ns()}"


def decode(line: str) -> bytes | Failure:
    """A client response (RFC 4954 §4): strict base64, or the Failure to answer with."""
    if len(line) > MAX_LINE:
        return Failure("malformed", f"response longer than {MAX_LINE} octets")
    if line and not line.strip():
        return Failure("malformed", "a response of only white space")
    try:
        raw = line.encode("ascii")
        data = binascii.a2b_base64(raw, strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return Failure("bad_base64", "not base64")
    # strict_mode still takes "QR==" for "QQ==" (bits after the last octet); an encoder never
    # writes that, so it is refused as well (RFC 4648 §3.5 allows a decoder to).
    if base64.b64encode(data) != raw:
        return Failure("bad_base64", "not canonical base64")
    return data


def _text(data: bytes) -> str | None:
    """User names and passwords are UTF-8 (RFC 4616 §2, and in practice for LOGIN too)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Exchange:
    """One AUTH exchange: start() once, then step() for each line after a Challenge."""

    def __init__(self, mechanism: str, verifier: Verifier, *, hostname: str,
                 nonce: Callable[[], str] = default_nonce) -> None:
        name = mechanism.upper()
        if name not in MECHANISMS:
            raise ValueError(f"unknown SASL mechanism {mechanism!r}")
        self.mechanism = name
        self.verifier = verifier
        self.hostname = hostname
        self.nonce = nonce
        self.attempted_user: str | None = None  # for the log, never the password
        self.done = False
        self._started = False
        self._step: Callable[[bytes], Step] | None = None  # what the next line is for
        self._challenge = b""  # CRAM-MD5: the challenge sent

    # ---- entry points ----------------------------------------------------------------------

    def start(self, initial: str | None) -> Step:
        """`AUTH <mechanism> [initial]`: initial is the argument after the name, None when the
        client sent none, "=" for an empty one (RFC 4954 §4)."""
        if self._started:
            raise RuntimeError("Exchange.start() called twice")
        self._started = True
        if self.mechanism == "CRAM-MD5":
            if initial is not None:
                # RFC 4954 §4: an initial response to a mechanism where the server speaks
                # first is refused with 501.
                return self._end(Failure("malformed", "CRAM-MD5 takes no initial response"))
            return self._cram_challenge()
        first = self._plain if self.mechanism == "PLAIN" else self._login_user
        if initial is None:
            self._step = first
            # RFC 4616 §2: PLAIN starts with an empty challenge; LOGIN asks for the user name.
            return Challenge("" if self.mechanism == "PLAIN" else LOGIN_USER_PROMPT)
        # LOGIN has no initial response in its draft, but clients send the user name as one
        # (AUTH LOGIN <user>) and servers take it; it is then the answer to "Username:".
        if initial == "*":
            return self._end(Failure("cancelled", "cancelled by the client"))
        data = b"" if initial == "=" else decode(initial)
        if isinstance(data, Failure):
            return self._end(data)
        return self._outcome(first(data))

    def step(self, line: str) -> Step:
        """One client line after a 334 (without its CRLF)."""
        if self._step is None or self.done:
            raise RuntimeError("Exchange.step() with no challenge outstanding")
        if line == "*":  # RFC 4954 §4: the client cancels the exchange
            return self._end(Failure("cancelled", "cancelled by the client"))
        data = decode(line)
        if isinstance(data, Failure):
            return self._end(data)
        return self._outcome(self._step(data))

    # ---- PLAIN (RFC 4616) ------------------------------------------------------------------

    def _plain(self, data: bytes) -> Step:
        # message = [authzid] UTF8NUL authcid UTF8NUL passwd (RFC 4616 §2); a NUL inside a
        # field makes a fourth part.
        parts = data.split(b"\0")
        if len(parts) != 3:
            return Failure("malformed", f"PLAIN: {len(parts)} NUL-separated parts, not 3")
        texts = [_text(p) for p in parts]
        if None in texts:
            return Failure("malformed", "PLAIN: not UTF-8")
        authzid, authcid, password = texts
        if not authcid or not password:
            return Failure("malformed", "PLAIN: empty user name or password")
        self.attempted_user = authcid
        # Acting as another user is not offered: the identity must be the one authenticated
        # (RFC 4616 §2 lets the server refuse any authzid it does not allow).
        if authzid and authzid != authcid:
            return Failure("invalid", f"PLAIN: authorization identity {authzid!r} is not the user")
        return self._check(authcid, password)

    # ---- LOGIN (draft-murchison-sasl-login) ------------------------------------------------

    def _login_user(self, data: bytes) -> Step:
        user = _text(data)
        if not user:
            return Failure("malformed", "LOGIN: empty user name" if user == "" else "LOGIN: user name not UTF-8")
        self.attempted_user = user
        self._step = self._login_password
        return Challenge(LOGIN_PASSWORD_PROMPT)

    def _login_password(self, data: bytes) -> Step:
        password = _text(data)
        if not password:
            return Failure("malformed", "LOGIN: empty password" if password == "" else "LOGIN: password not UTF-8")
        assert self.attempted_user is not None
        return self._check(self.attempted_user, password)

    # ---- CRAM-MD5 (RFC 2195) ---------------------------------------------------------------

    def _cram_challenge(self) -> Step:
        # RFC 2195 §2: a msg-id-like challenge, <random.timestamp@hostname>.
        self._challenge = f"<{self.nonce()}@{self.hostname}>".encode()
        self._step = self._cram_response
        return Challenge(base64.b64encode(self._challenge).decode("ascii"))

    def _cram_response(self, data: bytes) -> Step:
        # The response is "user SP digest", the digest 32 lower-case hex digits of
        # HMAC-MD5(secret, challenge) (RFC 2195 §2).  The user is what comes before the last
        # space, so a name with a space in it is looked up as sent.
        text = _text(data)
        if text is None:
            return Failure("malformed", "CRAM-MD5: not UTF-8")
        user, sep, digest = text.rpartition(" ")
        if not sep or not user or len(digest) != 32 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            return Failure("malformed", "CRAM-MD5: not 'user digest'")
        self.attempted_user = user
        try:
            secret = self.verifier.cram_md5_secret(user)
        except (ElemtaError, OSError) as exc:
            return Failure("unavailable", f"password backend: {exc}")
        # An unknown user (or one without a CRAM-MD5 secret) costs the same HMAC as a known
        # one, against a secret nobody knows, so the answer's timing tells nothing.
        key = secret if secret is not None else secrets.token_bytes(16)
        expected = hmac.new(key, self._challenge, hashlib.md5).hexdigest()
        if hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("ascii")) and secret is not None:
            return Success(user)
        return Failure("invalid", "CRAM-MD5: wrong digest" if secret is not None else "CRAM-MD5: no secret for user")

    # ---- common ----------------------------------------------------------------------------

    def _check(self, user: str, password: str) -> Step:
        try:
            verdict = self.verifier.check_password(user, password)
        except (ElemtaError, OSError) as exc:
            verdict = None
            reason = f"password backend: {exc}"
        else:
            reason = "password backend unavailable"
        if verdict is None:
            return Failure("unavailable", reason)
        if verdict:
            return Success(user)
        return Failure("invalid", "wrong user name or password")

    def _outcome(self, outcome: Step) -> Step:
        if not isinstance(outcome, Challenge):
            return self._end(outcome)
        return outcome

    def _end(self, outcome: Step) -> Step:
        self.done = True
        self._step = None
        return outcome
