"""The SMTP server session as a pure state machine (sans-IO).

Bytes go in through feed(); a list of outputs comes back: Reply objects to send in order and,
at the end of a message, one Enqueue.  The caller (smtp/server.py) stores the message and hands
the outcome back with enqueued() / enqueue_failed(), which gives the final reply.  Nothing here
touches a socket or the disk, so every rule is unit-testable with plain bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from elemta import log as logmod
from elemta import metrics
from elemta.smtp import auth, dotreader, replies
from elemta.smtp import envelope as env
from elemta.smtp.context import (
    AUTH,
    BDAT_CHUNK,
    CLOSED,
    COMMAND,
    DATA,
    TLS_WAIT,
    TRANSITIONS,
    WAIT_QUEUE,
    Client,
    Enqueue,
    Services,
    Settings,
    StartTls,
    State,
)
from elemta.smtp.hooks import PluginHooks
from elemta.smtp.replies import Reply
from elemta.smtp.transaction import MailTransaction

# The server and the tests take the session's data types from here, beside Session.
__all__ = ["CLOSED", "Client", "Enqueue", "Services", "Session", "Settings", "StartTls"]

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.  MAIL and RCPT
# may be longer by what their extensions add (RFC 1870 §3: SIZE +26; RFC 3461 §4: +100 on
# MAIL, +500 on RCPT; RFC 6710: MT-PRIORITY +16), so they get 1,024.
MAX_COMMAND = 512
MAX_ENVELOPE_COMMAND = 1024

HTTP_VERBS = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT"})
COMMANDS = ("EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
            "VRFY", "HELP")

# AUTH failures and their replies (RFC 4954 §4, §6).
_AUTH_FAILURES = {
    "bad_base64": replies.AUTH_BAD_BASE64,
    "malformed": replies.AUTH_BAD_BASE64,
    "cancelled": replies.AUTH_CANCELLED,
    "invalid": replies.AUTH_INVALID,
    "unavailable": replies.AUTH_UNAVAILABLE,
}


class Session(PluginHooks, MailTransaction):
    def __init__(self, settings: Settings, client: Client, services: Services, tls=None):
        self.settings = settings
        self.client = client
        self.services = services
        self.tls = tls  # a tls.TlsInfo once TLS is up (from the start on implicit TLS)
        self.user: str | None = None  # the authenticated user
        self.auth_failures = 0
        self._auth: auth.Exchange | None = None
        self.state = COMMAND
        self.helo: str | None = None
        self.esmtp = False
        self.envelope: env.Envelope | None = None
        self.errors = 0
        self.commands_seen = 0
        self._verb = "unknown"  # the command being answered, for metrics
        self._buf = bytearray()
        self._draining = False  # discarding an overlong command line up to its end
        self._data: dotreader.DataReader | None = None
        self._chunks: list[bytes] = []  # BDAT chunks of the current message
        self._chunk: dotreader.Chunk | None = None  # the one being read
        self.refused = False  # a plugin refused the connection: only QUIT is served (554)
        self._pconn = None  # the plugins' view of this connection (smtp/hooks.py)
        self._pnotes = None  # ... and of the transaction, with what they decided about it
        self._conn_auth_results: dict[str, list[str]] = {}  # hook -> its latest auth results

    # ---- entry points ----------------------------------------------------------------------

    def _to(self, state: State) -> None:
        """Move to state, if TRANSITIONS allows it from here: a move it does not list is a bug
        in elemta, never the client's doing, and ends the session (451, logged)."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"SMTP session: no move from {self.state.name} to {state.name}")
        self.state = state

    def greeting(self) -> Reply:
        refusal = self._connect_refusal()
        if refusal is not None:
            if refusal.close:
                self._to(CLOSED)
            metrics.count_reply("connect", refusal.code, refusal.enhanced)
            return refusal
        metrics.count_reply("connect", 220, "")
        return replies.GREETING.format(host=self.settings.hostname)

    def disconnected(self) -> None:
        """The connection is gone (the server calls this last, whatever happened)."""
        self._notice("on_disconnect")

    def feed(self, data: bytes) -> list:
        """Take input from the client; return replies (and maybe an Enqueue) in order."""
        if self.state == CLOSED:
            return []
        self._buf += data
        return self._run()

    def input_before_reply(self) -> list:
        """The client sent input before the greeting or before the 354 (RFC 2920 §3.1)."""
        self.services.log("sync_error", ip=self.client.ip, conn=self.client.conn)
        return self._close_with(replies.SYNC_ERROR)

    def timed_out(self) -> list:
        return self._close_with(replies.TIMEOUT.format(host=self.settings.hostname))

    def shutting_down(self) -> list:
        return self._close_with(replies.SHUTTING_DOWN.format(host=self.settings.hostname))

    def tls_started(self, info) -> list:
        """The handshake after our 220 succeeded.  RFC 3207 §4.2: forget all the client said
        before it; EHLO must come again.  Nothing pipelined after STARTTLS was kept."""
        self.tls = info
        self.helo, self.esmtp, self.user = None, False, None
        self._conn_auth_results.pop("on_helo", None)  # RFC 3207 §4.2: what was said before TLS is gone
        self._conn_auth_results.pop("on_auth", None)
        self._reset()
        self._to(COMMAND)
        self.services.log("tls", ip=self.client.ip, conn=self.client.conn, tls=str(info))
        return []

    @property
    def in_data(self) -> bool:
        return self.state in (DATA, BDAT_CHUNK)

    @property
    def awaiting_data(self) -> bool:
        """True right after a 354: nothing may have arrived yet (checked by the server)."""
        return self.state == DATA and self._data is not None and self._data.received == 0

    # ---- the input loop --------------------------------------------------------------------

    def _run(self) -> list:
        out: list = []
        while self.state not in (WAIT_QUEUE, CLOSED):
            if self.state == DATA:
                assert self._data is not None  # set with the move to DATA
                done = self._data.feed(self._buf)
                self._buf.clear()
                if done is None:
                    break
                text, rest = done
                self._buf += rest
                out += self._tally("DATA", self._end_of_data(text))
            elif self.state == BDAT_CHUNK:
                assert self._chunk is not None  # set with the move to BDAT_CHUNK
                if not self._chunk.take(self._buf):
                    break
                out += self._tally("BDAT", self._end_of_chunk())
            elif self.state == TLS_WAIT:
                break
            else:
                line = self._next_line(out)
                if line is None:
                    break
                if self.state == AUTH:
                    out += self._tally("AUTH", self._auth_line(line))
                else:
                    items = self._command(line)
                    out += self._tally(self._verb, items)
        return out

    @staticmethod
    def _tally(command: str, items: list) -> list:
        """Count the replies to command (metrics.py); return them."""
        for item in items:
            if isinstance(item, Reply):
                metrics.count_reply(command, item.code, item.enhanced)
        return items

    def _next_line(self, out: list) -> bytes | None:
        """The next complete command line without its line ending, or None if none yet."""
        while True:
            end = self._buf.find(b"\n")
            if self._draining:
                if end < 0:
                    self._buf.clear()
                    return None
                del self._buf[: end + 1]
                self._draining = False
                out += self._error(replies.COMMAND_TOO_LONG)
                if self.state == CLOSED:
                    return None
                continue
            if self.state == AUTH:
                limit = auth.MAX_LINE + 2  # RFC 4954 §4: SASL responses up to 12,288 octets
            elif self._buf[:4].upper() in (b"MAIL", b"RCPT"):
                limit = MAX_ENVELOPE_COMMAND
            else:
                limit = MAX_COMMAND
            if end < 0:
                if len(self._buf) > limit:
                    self._draining = True
                    continue
                return None
            if end + 1 > limit:
                del self._buf[: end + 1]
                out += self._error(replies.COMMAND_TOO_LONG)
                if self.state == CLOSED:
                    return None
                continue
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            # Commands end in CRLF; a bare LF is tolerated here (as Postfix does) since a
            # command line cannot smuggle anything: it is one line either way.
            return line[:-1] if line.endswith(b"\r") else line

    def _command(self, line: bytes) -> list:
        text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        self._verb = verb if verb in _HANDLERS else "unknown"  # a bounded metrics label
        self.commands_seen += 1
        if self.commands_seen == 1 and verb in HTTP_VERBS:
            self.services.log("reject", ip=self.client.ip, conn=self.client.conn, reason="http", verb=verb)
            return self._close_with(replies.NOT_HTTP)
        if self.refused and verb not in ("QUIT", "NOOP"):
            # RFC 5321 §3.1: after a 554 greeting, 503 to everything but QUIT.
            return self._sequence("connection refused, send QUIT")
        handler = _HANDLERS.get(verb)
        if handler is None:
            self.services.log("unknown_command", ip=self.client.ip, conn=self.client.conn, verb=verb[:16])
            return self._error(replies.UNKNOWN_COMMAND)
        return handler(self, arg.strip(" "))

    # ---- helpers ---------------------------------------------------------------------------

    def _error(self, reply: Reply) -> list:
        """Send an error reply; past the error budget, close with 421 after it."""
        if reply.code >= 500:
            self.errors += 1
            if self.errors >= self.settings.max_errors:
                self.services.log("too_many_errors", ip=self.client.ip, conn=self.client.conn, errors=self.errors)
                return [reply] + self._close_with(
                    replies.TOO_MANY_ERRORS.format(host=self.settings.hostname)
                )
        return [reply]

    def _close_with(self, reply: Reply) -> list:
        self._to(CLOSED)
        self._buf.clear()
        self._auth = None
        return [reply]

    def _reset(self) -> None:
        self.envelope = None
        self._pnotes = None
        self._data = None
        self._chunks = []

    def _after_queue(self, reply: Reply) -> list:
        self._reset()
        self._to(COMMAND)
        return [reply] + self._run()

    def _sequence(self, why: str) -> list:
        return self._error(replies.BAD_SEQUENCE.format(why=why))

    def _syntax(self, usage: str) -> list:
        return self._error(replies.SYNTAX.format(usage=usage))

    # ---- commands --------------------------------------------------------------------------

    def _hello(self, arg: str, esmtp: bool) -> list:
        if not arg or " " in arg:
            return self._syntax("EHLO hostname" if esmtp else "HELO hostname")
        # RFC 5321 §4.1.4: a second EHLO/HELO resets the transaction like RSET.
        self._reset()
        self.helo = arg
        self.esmtp = esmtp
        refusal = self._refusal(self._hook("on_helo"))
        if refusal is not None:
            self.helo, self.esmtp = None, False
            return self._error(refusal)
        self.services.log("helo", ip=self.client.ip, conn=self.client.conn, helo=arg[:64], esmtp=esmtp)
        if not esmtp:
            return [replies.HELO.format(host=self.settings.hostname)]
        lines = [
            self.settings.hostname,
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ]
        if self.settings.starttls and self.tls is None:
            lines.append("STARTTLS")
        mechanisms = self._auth_mechanisms()
        if mechanisms and self.user is None:
            lines.append("AUTH " + " ".join(mechanisms))
        if self.client.trusted:
            lines.append("MT-PRIORITY MIXER")  # RFC 6710 §7: the policy the levels follow
        return [replies.EHLO.format(lines="\n".join(lines))]

    def _starttls(self, arg: str) -> list:
        if arg:
            return self._syntax("STARTTLS")
        if self.tls is not None:
            return self._error(replies.TLS_ACTIVE)
        if not self.settings.starttls:
            return self._error(replies.TLS_UNAVAILABLE)
        if self.envelope is not None:
            return self._sequence("MAIL transaction in progress")
        if self._buf:
            # RFC 3207 §6 (the STARTTLS command injection of CVE-2011-0411): what came after
            # STARTTLS in the clear must never run after the handshake as if encrypted.
            self.services.log("starttls_pipelined", ip=self.client.ip, conn=self.client.conn,
                              discarded=len(self._buf))
            self._buf.clear()
        self._to(TLS_WAIT)
        return [replies.TLS_READY, StartTls()]

    # ---- AUTH (RFC 4954) -------------------------------------------------------------------

    def _auth_mechanisms(self) -> tuple[str, ...]:
        """What AUTH offers now: nothing on mx listeners (users log in on submission ports,
        which keeps password guessing off port 25) or without a password file; PLAIN and LOGIN
        only under TLS (RFC 4954 §4), except from trusted networks in dev mode."""
        if self.services.verifier is None or not self.settings.submission:
            return ()
        clear_ok = self.tls is not None or (self.settings.accept_all and self.client.trusted)
        return tuple(m for m in self.settings.auth_mechanisms
                     if clear_ok or m not in auth.PLAINTEXT_MECHANISMS)

    def _auth_cmd(self, arg: str) -> list:
        words = arg.split(" ")
        if not arg or len(words) > 2:
            return self._syntax("AUTH mechanism [initial-response]")
        if self.helo is None or not self.esmtp:
            return self._sequence("send EHLO first")
        if self.user is not None:
            return self._error(replies.AUTH_ALREADY)
        if self.envelope is not None:
            return self._sequence("MAIL transaction in progress")
        guard = self.services.guard
        if guard is not None and guard.auth_locked(self.client.ip):
            self.services.log("reject", ip=self.client.ip, conn=self.client.conn, reason="auth_lockout",
                              reply="421 4.7.0")
            return self._close_with(replies.AUTH_TOO_MANY.format(host=self.settings.hostname))
        mechanism = words[0].upper()
        if mechanism not in self._auth_mechanisms():
            if mechanism in self.settings.auth_mechanisms and mechanism in auth.PLAINTEXT_MECHANISMS:
                return self._error(replies.AUTH_NEEDS_TLS)
            return self._error(replies.AUTH_UNKNOWN_MECHANISM)
        verifier = self.services.verifier
        assert verifier is not None  # no mechanism is offered without a password file
        self._auth = auth.Exchange(mechanism, verifier, hostname=self.settings.hostname)
        return self._auth_outcome(self._auth.start(words[1] if len(words) == 2 else None))

    def _auth_line(self, line: bytes) -> list:
        assert self._auth is not None  # the AUTH state has its exchange
        return self._auth_outcome(self._auth.step(line.decode("ascii", "replace")))

    def _auth_outcome(self, outcome) -> list:
        if isinstance(outcome, auth.Challenge):
            self._to(AUTH)
            return [replies.AUTH_CHALLENGE.format(text=outcome.text)]
        self._to(COMMAND)
        exchange, self._auth = self._auth, None
        assert exchange is not None  # started by _auth_cmd
        fields = {"ip": self.client.ip, "conn": self.client.conn, "mechanism": exchange.mechanism}
        metrics.AUTH.labels(exchange.mechanism, "ok" if isinstance(outcome, auth.Success) else outcome.kind).inc()
        if isinstance(outcome, auth.Success):
            self.user = outcome.user.lower()  # as the password file compares names
            refusal = self._refusal(self._hook("on_auth"))
            if refusal is not None:
                self.user = None
                return self._error(refusal)
            self.services.log("auth", user=outcome.user, **fields)
            return [replies.AUTH_OK]
        # Never the password; the name tried helps an admin see a guessing attack.
        tried = (exchange.attempted_user or "-")[:64]
        self.services.log("auth_failed", level=logmod.WARNING, user=tried, reason=outcome.kind, **fields)
        reply = _AUTH_FAILURES[outcome.kind]
        if outcome.kind != "invalid":
            return self._error(reply)
        self.auth_failures += 1
        if self.services.guard is not None:
            self.services.guard.auth_failed(self.client.ip)
        if self.auth_failures >= self.settings.auth_max_failures:
            return [reply] + self._close_with(replies.AUTH_TOO_MANY.format(host=self.settings.hostname))
        return self._error(reply)

    def _rset(self, arg: str) -> list:
        if arg:
            return self._syntax("RSET")
        self._reset()
        return [replies.OK]

    def _noop(self, arg: str) -> list:
        return [replies.OK]  # RFC 5321 §4.1.1.9: NOOP may carry a string, which is ignored

    def _quit(self, arg: str) -> list:
        if arg:
            return self._syntax("QUIT")
        return self._close_with(replies.BYE)

    def _vrfy(self, arg: str) -> list:
        if not arg:
            return self._syntax("VRFY address")
        return [replies.VRFY]

    def _expn(self, arg: str) -> list:
        return self._error(replies.EXPN)

    def _help(self, arg: str) -> list:
        return [replies.HELP.format(commands=" ".join(COMMANDS))]


_HANDLERS: dict[str, Callable[[Session, str], list]] = {
    "EHLO": lambda session, arg: session._hello(arg, esmtp=True),
    "HELO": lambda session, arg: session._hello(arg, esmtp=False),
    "STARTTLS": Session._starttls,
    "AUTH": Session._auth_cmd,
    "MAIL": Session._mail,
    "RCPT": Session._rcpt,
    "DATA": Session._data_cmd,
    "BDAT": Session._bdat,
    "RSET": Session._rset,
    "NOOP": Session._noop,
    "QUIT": Session._quit,
    "VRFY": Session._vrfy,
    "EXPN": Session._expn,
    "HELP": Session._help,
}
