"""The AUTH command (RFC 4954): which mechanisms are offered, the exchange, and what a failure
costs.  A part of smtp/session.py's Session, held as session.login; the SASL mechanisms and
the password check themselves are auth.py's.  What it reads of the session is
parts.SessionView; it sets session.user when a login succeeds.
"""

from __future__ import annotations

from elemta import log as logmod
from elemta import metrics
from elemta.smtp import auth, replies
from elemta.smtp.context import AUTH, COMMAND, Output
from elemta.smtp.parts import SessionView

# AUTH failures and their replies (RFC 4954 §4, §6).
_FAILURES = {
    "bad_base64": replies.AUTH_BAD_BASE64,
    "malformed": replies.AUTH_BAD_BASE64,
    "cancelled": replies.AUTH_CANCELLED,
    "invalid": replies.AUTH_INVALID,
    "unavailable": replies.AUTH_UNAVAILABLE,
}


class Login:
    def __init__(self, session: SessionView):
        self.session = session
        self.failures = 0  # wrong passwords in this session (smtp.auth_max_failures)
        self.exchange: auth.Exchange | None = None  # the exchange under way (state AUTH)

    def mechanisms(self) -> tuple[str, ...]:
        """What AUTH offers now: nothing on mx listeners (users log in on submission ports,
        which keeps password guessing off port 25) or without a password file; PLAIN and LOGIN
        only under TLS (RFC 4954 §4), except from trusted networks in dev mode."""
        s = self.session
        if s.services.verifier is None or not s.settings.submission:
            return ()
        clear_ok = s.tls is not None or (s.settings.accept_all and s.client.trusted)
        return tuple(m for m in s.settings.auth_mechanisms
                     if clear_ok or m not in auth.PLAINTEXT_MECHANISMS)

    def command(self, arg: str) -> list[Output]:
        s = self.session
        words = arg.split(" ")
        if not arg or len(words) > 2:
            return s.syntax_error("AUTH mechanism [initial-response]")
        if s.helo is None or not s.esmtp:
            return s.out_of_sequence("send EHLO first")
        if s.user is not None:
            return s.error(replies.AUTH_ALREADY)
        if s.in_transaction():
            return s.out_of_sequence("MAIL transaction in progress")
        guard = s.services.guard
        if guard is not None and guard.auth_locked(s.client.ip):
            s.services.log("reject", ip=s.client.ip, conn=s.client.conn, reason="auth_lockout",
                           reply="421 4.7.0")
            return s.close_with(replies.AUTH_TOO_MANY.format(host=s.settings.hostname))
        mechanism = words[0].upper()
        if mechanism not in self.mechanisms():
            if mechanism in s.settings.auth_mechanisms and mechanism in auth.PLAINTEXT_MECHANISMS:
                return s.error(replies.AUTH_NEEDS_TLS)
            return s.error(replies.AUTH_UNKNOWN_MECHANISM)
        verifier = s.services.verifier
        assert verifier is not None  # no mechanism is offered without a password file
        self.exchange = auth.Exchange(mechanism, verifier, hostname=s.settings.hostname)
        return self._outcome(self.exchange.start(words[1] if len(words) == 2 else None))

    def line(self, line: bytes) -> list[Output]:
        """The client's next line in the exchange (state AUTH)."""
        assert self.exchange is not None  # the AUTH state has its exchange
        return self._outcome(self.exchange.step(line.decode("ascii", "replace")))

    def _outcome(self, outcome) -> list[Output]:
        s = self.session
        if isinstance(outcome, auth.Challenge):
            s.enter(AUTH)
            return [replies.AUTH_CHALLENGE.format(text=outcome.text)]
        s.enter(COMMAND)
        exchange, self.exchange = self.exchange, None
        assert exchange is not None  # started by command()
        fields = {"ip": s.client.ip, "conn": s.client.conn, "mechanism": exchange.mechanism}
        metrics.AUTH.labels(exchange.mechanism, "ok" if isinstance(outcome, auth.Success) else outcome.kind).inc()
        if isinstance(outcome, auth.Success):
            s.user = outcome.user.lower()  # as the password file compares names
            refusal = s.hooks.refusal("on_auth")
            if refusal is not None:
                s.user = None
                return s.error(refusal)
            s.services.log("auth", user=outcome.user, **fields)
            return [replies.AUTH_OK]
        # Never the password; the name tried helps an admin see a guessing attack.
        tried = (exchange.attempted_user or "-")[:64]
        s.services.log("auth_failed", level=logmod.WARNING, user=tried, reason=outcome.kind, **fields)
        reply = _FAILURES[outcome.kind]
        if outcome.kind != "invalid":
            return s.error(reply)
        self.failures += 1
        if s.services.guard is not None:
            s.services.guard.auth_failed(s.client.ip)
        if self.failures >= s.settings.auth_max_failures:
            return [reply] + s.close_with(replies.AUTH_TOO_MANY.format(host=s.settings.hostname))
        return s.error(reply)
