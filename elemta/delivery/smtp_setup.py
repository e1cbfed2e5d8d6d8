"""Setting up an outbound session without I/O (sans-IO): what the greeting, EHLO, STARTTLS and
AUTH replies mean and what the client does next.  smtp_client.SmtpConnection does the socket
work and the TLS handshake around these decisions; smtp_transaction.py does the same for the
mail transaction that follows.  This is where a TLS policy decides (and where DANE and
MTA-STS will).
"""

from __future__ import annotations

import base64

from elemta.delivery.smtp_transaction import Failure
from elemta.reply import Reply


def greeting(reply: Reply) -> Failure | None:
    """None if the server greets with 220.  RFC 5321 §3.1: a 554 greeting means "not here";
    another MX may take the mail."""
    return None if reply.code == 220 else Failure("greeting", "greeting refused", reply)


def after_ehlo(reply: Reply, verb: str, lmtp: bool) -> str | Failure:
    """"ok" (EHLO or LHLO taken), "helo" (try HELO: RFC 5321 §3.2, a server that does not know
    EHLO; LMTP has no such fallback, RFC 2033 §4.1), or the failure."""
    if reply.code == 250:
        return "ok"
    if reply.is_permanent and not lmtp:
        return "helo"
    return Failure("ehlo", f"{verb} refused", reply)


def after_helo(reply: Reply, verb: str) -> Failure | None:
    return None if reply.code == 250 else Failure("ehlo", f"{verb} refused", reply)


def tls_required(policy: str) -> bool:
    return policy in ("encrypt", "verify")


def before_starttls(policy: str, extensions: dict[str, str]) -> str | Failure:
    """"starttls" (send it), "plain" (go on without TLS), or the failure.

    TLS policy failures are transient (4.7.x): the remote or our configuration may change
    while the message waits, and a bounce for that would be premature."""
    if policy == "none":
        return "plain"
    if "STARTTLS" in extensions:
        return "starttls"
    if not tls_required(policy):
        return "plain"
    return Failure("tls-policy", f"TLS is required ({policy}) but STARTTLS is not offered",
                   None, "4.7.4", permanent=False)


def after_starttls(policy: str, reply: Reply, early_data: bool) -> str | Failure:
    """"handshake", "plain" (RFC 3207 §4: the client decides; 'may' goes on in clear), or the
    failure.  early_data: bytes came before the handshake, which would survive RFC 3207 §4.2's
    "forget what came before TLS" and be trusted (the STARTTLS response injection attack)."""
    if reply.code != 220:
        if not tls_required(policy):
            return "plain"
        return Failure("starttls", "STARTTLS refused", reply, "4.7.4", permanent=False)
    if early_data:
        return Failure("starttls", "data sent before the TLS handshake", None, "4.5.0")
    return "handshake"


class Login:
    """AUTH at a relayhost (RFC 4954): PLAIN with its initial response (RFC 4616 §2) if
    offered, else LOGIN answering the server's two 334 prompts.

    first() gives the first command line (or the failure), then each reply goes to next(),
    which gives the next line, "done" after 235, or the failure.  A refused login is a
    configuration problem: the mail waits in the queue (as with Postfix's
    smtp_sasl_auth_soft_bounce) instead of bouncing.
    """

    def __init__(self, user: str, password: str, extensions: dict[str, str], tls: bool):
        self._answers: list[str] = []
        self._user, self._password = user, password
        self._mechanisms = extensions.get("AUTH", "").upper().split()
        self._tls = tls

    def first(self) -> str | Failure:
        if not self._tls:
            # Never a password in clear text, whatever the policy (the security
            # considerations of RFC 4954 and RFC 4616).
            return Failure("auth", "refusing to authenticate without TLS", None, "4.7.10", permanent=False)
        if "PLAIN" in self._mechanisms:
            return f"AUTH PLAIN {_b64(chr(0) + self._user + chr(0) + self._password)}"
        if "LOGIN" in self._mechanisms:
            self._answers = [_b64(self._user), _b64(self._password)]
            return "AUTH LOGIN"
        return Failure("auth", "no AUTH PLAIN or LOGIN offered", None, "4.7.4", permanent=False)

    def next(self, reply: Reply) -> str | Failure:
        if reply.code == 334 and self._answers:
            return self._answers.pop(0)
        if reply.code == 235:
            return "done"
        enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.7.0"
        return Failure("auth", "authentication failed", reply, enhanced, permanent=False)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
