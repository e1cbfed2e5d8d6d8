"""The SMTP server session as a pure state machine (sans-IO).

Bytes go in through feed(); a list of typed outputs (context.Output) comes back, in the order
the server acts on them: Reply to send, StartTls after STARTTLS's 220, Enqueue at the end of a
message, Close after the last reply.  The caller (smtp/server.py) stores the message and hands
the outcome back with enqueued() / enqueue_failed(), which gives the final reply.  Nothing here
touches a socket or the disk, so every rule is unit-testable with plain bytes.

The session owns the input loop, its state (context.State, moves checked against
context.TRANSITIONS) and the session-level commands; its parts are objects with state of
their own (parts.py): the mail transaction, the AUTH command and the plugins' hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from elemta import metrics
from elemta.queue.model import NewMessage
from elemta.smtp import auth, replies
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
    Close,
    Enqueue,
    Output,
    Services,
    Settings,
    StartTls,
    State,
)
from elemta.smtp.hooks import PluginHooks
from elemta.smtp.login import Login
from elemta.smtp.replies import Reply
from elemta.smtp.tls import TlsInfo
from elemta.smtp.transaction import MailTransaction

# The server and the tests take the session's data types from here, beside Session.
__all__ = ["CLOSED", "Client", "Close", "Enqueue", "Output", "Services", "Session", "Settings", "StartTls"]

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.  MAIL and RCPT
# may be longer by what their extensions add (RFC 1870 §3: SIZE +26; RFC 3461 §4: +100 on
# MAIL, +500 on RCPT; RFC 6710: MT-PRIORITY +16), so they get 1,024.
MAX_COMMAND = 512
MAX_ENVELOPE_COMMAND = 1024

HTTP_VERBS = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT"})
COMMANDS = ("EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
            "VRFY", "HELP")


# The greeting and the EHLO reply are the same for most sessions of a listener: made (and
# their wire form kept, reply.py) once, not once a connection. Keyed by their text.
@functools.lru_cache(maxsize=64)
def _greeting(host: str) -> Reply:
    return replies.GREETING.format(host=host)


@functools.lru_cache(maxsize=256)
def _ehlo(lines: tuple[str, ...]) -> Reply:
    return replies.EHLO.format(lines="\n".join(lines))


class Session:
    def __init__(self, settings: Settings, client: Client, services: Services, tls: TlsInfo | None = None):
        self.settings = settings
        self.client = client
        self.services = services
        self.tls = tls  # a tls.TlsInfo once TLS is up (from the start on implicit TLS)
        self.user: str | None = None  # the authenticated user
        self.state = COMMAND
        self.helo: str | None = None
        self.esmtp = False
        self.errors = 0
        self.commands_seen = 0
        self.verb = "unknown"  # the command being answered, for metrics
        self.refused = False  # a plugin refused the connection: only QUIT is served (554)
        self._buf = bytearray()
        self._draining = False  # discarding an overlong command line up to its end
        self.hooks: PluginHooks = PluginHooks(self)
        self.mail: MailTransaction = MailTransaction(self)
        self.login: Login = Login(self)

    # ---- entry points ----------------------------------------------------------------------

    def enter(self, state: State) -> None:
        """Move to state, if TRANSITIONS allows it from here: a move it does not list is a bug
        in elemta, never the client's doing, and ends the session (451, logged)."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"SMTP session: no move from {self.state.name} to {state.name}")
        self.state = state

    def greeting(self) -> list[Output]:
        refusal = self.hooks.connect_refusal()
        if refusal is None:
            metrics.count_reply("connect", 220, "")
            return [_greeting(self.settings.hostname)]
        metrics.count_reply("connect", refusal.code, refusal.enhanced)
        if refusal.is_transient:  # RFC 5321 §3.1: 421, then close
            return self.close_with(refusal)
        self.refused = True  # RFC 5321 §3.1: 554, then only QUIT is served
        return [refusal]

    def disconnected(self) -> None:
        """The connection is gone (the server calls this last, whatever happened)."""
        self.hooks.notice("on_disconnect")

    def feed(self, data: bytes) -> list[Output]:
        """Take input from the client; return the outputs, in order."""
        if self.state == CLOSED:
            return []
        self._buf += data
        return self._run()

    def enqueued(self, message: NewMessage) -> list[Output]:
        """The queue committed the message an Enqueue asked for."""
        return self.mail.enqueued(message)

    def enqueue_failed(self, error: Exception) -> list[Output]:
        """The queue could not take the message an Enqueue asked for."""
        return self.mail.enqueue_failed(error)

    def input_before_reply(self) -> list[Output]:
        """The client sent input before the greeting or before the 354 (RFC 2920 §3.1)."""
        self.services.log("sync_error", ip=self.client.ip, conn=self.client.conn)
        return self.close_with(replies.SYNC_ERROR)

    def timed_out(self) -> list[Output]:
        return self.close_with(replies.TIMEOUT.format(host=self.settings.hostname))

    def shutting_down(self) -> list[Output]:
        return self.close_with(replies.SHUTTING_DOWN.format(host=self.settings.hostname))

    def tls_started(self, info: TlsInfo) -> list[Output]:
        """The handshake after our 220 succeeded.  RFC 3207 §4.2: forget all the client said
        before it; EHLO must come again.  Nothing pipelined after STARTTLS was kept."""
        self.tls = info
        self.helo, self.esmtp, self.user = None, False, None
        self.hooks.tls_started()
        self.mail.reset()
        self.enter(COMMAND)
        self.services.log("tls", ip=self.client.ip, conn=self.client.conn, tls=str(info))
        return []

    @property
    def envelope(self) -> env.Envelope | None:
        """The transaction's envelope, from MAIL on."""
        return self.mail.envelope

    @property
    def in_data(self) -> bool:
        return self.state in (DATA, BDAT_CHUNK)

    @property
    def awaiting_data(self) -> bool:
        """True right after a 354: nothing may have arrived yet (checked by the server)."""
        return self.state == DATA and self.mail.data is not None and self.mail.data.received == 0

    # ---- the input loop --------------------------------------------------------------------

    def _run(self) -> list[Output]:
        out: list[Output] = []
        while self.state not in (WAIT_QUEUE, CLOSED):
            if self.state == DATA:
                assert self.mail.data is not None  # set with the move to DATA
                done = self.mail.data.feed(self._buf)
                self._buf.clear()
                if done is None:
                    break
                text, rest = done
                self._buf += rest
                out += self._tally("DATA", self.mail.end_of_data(text))
            elif self.state == BDAT_CHUNK:
                assert self.mail.chunk is not None  # set with the move to BDAT_CHUNK
                if not self.mail.chunk.take(self._buf):
                    break
                out += self._tally("BDAT", self.mail.end_of_chunk())
            elif self.state == TLS_WAIT:
                break
            else:
                line = self._next_line(out)
                if line is None:
                    break
                if self.state == AUTH:
                    out += self._tally("AUTH", self.login.line(line))
                else:
                    items = self._command(line)
                    out += self._tally(self.verb, items)
        return out

    @staticmethod
    def _tally(command: str, items: list[Output]) -> list[Output]:
        """Count the replies to command (metrics.py); return them."""
        for item in items:
            if isinstance(item, Reply):
                metrics.count_reply(command, item.code, item.enhanced)
        return items

    def _next_line(self, out: list[Output]) -> bytes | None:
        """The next complete command line without its line ending, or None if none yet."""
        while True:
            end = self._buf.find(b"\n")
            # A line shorter than MAX_COMMAND fits every state's limit: most lines skip this.
            if self._draining or not 0 <= end < MAX_COMMAND:
                if self._draining:
                    if end < 0:
                        self._buf.clear()
                        return None
                    del self._buf[: end + 1]
                    self._draining = False
                    out += self.error(replies.COMMAND_TOO_LONG)
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
                    out += self.error(replies.COMMAND_TOO_LONG)
                    if self.state == CLOSED:
                        return None
                    continue
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            # Commands end in CRLF; a bare LF is tolerated here (as Postfix does) since a
            # command line cannot smuggle anything: it is one line either way.
            return line[:-1] if line.endswith(b"\r") else line

    def _command(self, line: bytes) -> list[Output]:
        text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        self.verb = verb if verb in _HANDLERS else "unknown"  # a bounded metrics label
        self.commands_seen += 1
        if self.commands_seen == 1 and verb in HTTP_VERBS:
            self.services.log("reject", ip=self.client.ip, conn=self.client.conn, reason="http", verb=verb)
            return self.close_with(replies.NOT_HTTP)
        if self.refused and verb not in ("QUIT", "NOOP"):
            # RFC 5321 §3.1: after a 554 greeting, 503 to everything but QUIT.
            return self.out_of_sequence("connection refused, send QUIT")
        handler = _HANDLERS.get(verb)
        if handler is None:
            self.services.log("unknown_command", ip=self.client.ip, conn=self.client.conn, verb=verb[:16])
            return self.error(replies.UNKNOWN_COMMAND)
        return handler(self, arg.strip(" "))

    # ---- the answers the parts share (parts.SessionView) -----------------------------------

    def error(self, reply: Reply) -> list[Output]:
        """Send an error reply; past the error budget, close with 421 after it."""
        if reply.code >= 500:
            self.errors += 1
            if self.errors >= self.settings.max_errors:
                self.services.log("too_many_errors", ip=self.client.ip, conn=self.client.conn, errors=self.errors)
                return [reply] + self.close_with(
                    replies.TOO_MANY_ERRORS.format(host=self.settings.hostname)
                )
        return [reply]

    def close_with(self, reply: Reply) -> list[Output]:
        self.enter(CLOSED)
        self._buf.clear()
        self.login.exchange = None
        return [reply, Close()]

    def in_transaction(self) -> bool:
        return self.mail.envelope is not None

    def input_pending(self) -> bool:
        return bool(self._buf)

    def after_queue(self, reply: Reply) -> list[Output]:
        self.mail.reset()
        self.enter(COMMAND)
        return [reply] + self._run()

    def out_of_sequence(self, why: str) -> list[Output]:
        return self.error(replies.BAD_SEQUENCE.format(why=why))

    def syntax_error(self, usage: str) -> list[Output]:
        return self.error(replies.SYNTAX.format(usage=usage))

    # ---- commands --------------------------------------------------------------------------

    def _hello(self, arg: str, esmtp: bool) -> list[Output]:
        if not arg or " " in arg:
            return self.syntax_error("EHLO hostname" if esmtp else "HELO hostname")
        # RFC 5321 §4.1.4: a second EHLO/HELO resets the transaction like RSET.
        self.mail.reset()
        self.helo = arg
        self.esmtp = esmtp
        refusal = self.hooks.refusal("on_helo")
        if refusal is not None:
            self.helo, self.esmtp = None, False
            return self.error(refusal)
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
        if self.tls is not None:
            lines.append("REQUIRETLS")  # RFC 8689 §2: over TLS only
        mechanisms = self.login.mechanisms()
        if mechanisms and self.user is None:
            lines.append("AUTH " + " ".join(mechanisms))
        if self.client.trusted:
            lines.append("MT-PRIORITY MIXER")  # RFC 6710 §7: the policy the levels follow
        return [_ehlo(tuple(lines))]

    def _starttls(self, arg: str) -> list[Output]:
        if arg:
            return self.syntax_error("STARTTLS")
        if self.tls is not None:
            return self.error(replies.TLS_ACTIVE)
        if not self.settings.starttls:
            return self.error(replies.TLS_UNAVAILABLE)
        if self.mail.envelope is not None:
            return self.out_of_sequence("MAIL transaction in progress")
        if self._buf:
            # RFC 3207 §6 (the STARTTLS command injection of CVE-2011-0411): what came after
            # STARTTLS in the clear must never run after the handshake as if encrypted.
            self.services.log("starttls_pipelined", ip=self.client.ip, conn=self.client.conn,
                              discarded=len(self._buf))
            self._buf.clear()
        self.enter(TLS_WAIT)
        return [replies.TLS_READY, StartTls()]

    def _rset(self, arg: str) -> list[Output]:
        if arg:
            return self.syntax_error("RSET")
        self.mail.reset()
        return [replies.OK]

    def _noop(self, arg: str) -> list[Output]:
        return [replies.OK]  # RFC 5321 §4.1.1.9: NOOP may carry a string, which is ignored

    def _quit(self, arg: str) -> list[Output]:
        if arg:
            return self.syntax_error("QUIT")
        return self.close_with(replies.BYE)

    def _vrfy(self, arg: str) -> list[Output]:
        if not arg:
            return self.syntax_error("VRFY address")
        return [replies.VRFY]

    def _expn(self, arg: str) -> list[Output]:
        return self.error(replies.EXPN)

    def _help(self, arg: str) -> list[Output]:
        return [replies.HELP.format(commands=" ".join(COMMANDS))]


_HANDLERS: dict[str, Callable[[Session, str], list[Output]]] = {
    "EHLO": lambda session, arg: session._hello(arg, esmtp=True),
    "HELO": lambda session, arg: session._hello(arg, esmtp=False),
    "STARTTLS": Session._starttls,
    "AUTH": lambda session, arg: session.login.command(arg),
    "MAIL": lambda session, arg: session.mail.mail(arg),
    "RCPT": lambda session, arg: session.mail.rcpt(arg),
    "DATA": lambda session, arg: session.mail.data_cmd(arg),
    "BDAT": lambda session, arg: session.mail.bdat(arg),
    "RSET": Session._rset,
    "NOOP": Session._noop,
    "QUIT": Session._quit,
    "VRFY": Session._vrfy,
    "EXPN": Session._expn,
    "HELP": Session._help,
}
