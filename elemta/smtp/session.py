"""The SMTP server session as a pure state machine (sans-IO).

Bytes go in through feed(); a list of outputs comes back: Reply objects to send in order and,
at the end of a message, one Enqueue.  The caller (smtp/server.py) stores the message and hands
the outcome back with enqueued() / enqueue_failed(), which gives the final reply.  Nothing here
touches a socket or the disk, so every rule is unit-testable with plain bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from elemta.smtp import dotreader, replies
from elemta.smtp import envelope as env
from elemta.smtp.context import (
    BDAT_CHUNK,
    CLOSED,
    COMMAND,
    DATA,
    WAIT_QUEUE,
    Client,
    Enqueue,
    Services,
    Settings,
)
from elemta.smtp.replies import Reply
from elemta.smtp.transaction import MailTransaction

# The server and the tests take the session's data types from here, beside Session.
__all__ = ["CLOSED", "Client", "Enqueue", "Services", "Session", "Settings"]

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.  MAIL and RCPT
# may be longer by what their extensions add (RFC 1870 §3: SIZE +26; RFC 3461 §4: +100 on
# MAIL, +500 on RCPT; RFC 6710: MT-PRIORITY +16), so they get 1,024.
MAX_COMMAND = 512
MAX_ENVELOPE_COMMAND = 1024

HTTP_VERBS = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT"})
COMMANDS = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP")


class Session(MailTransaction):
    def __init__(self, settings: Settings, client: Client, services: Services):
        self.settings = settings
        self.client = client
        self.services = services
        self.state = COMMAND
        self.helo: str | None = None
        self.esmtp = False
        self.envelope: env.Envelope | None = None
        self.errors = 0
        self.commands_seen = 0
        self._buf = bytearray()
        self._draining = False  # discarding an overlong command line up to its end
        self._data: dotreader.DataReader | None = None
        self._chunks: list[bytes] = []  # BDAT chunks of the current message
        self._chunk: dotreader.Chunk | None = None  # the one being read

    # ---- entry points ----------------------------------------------------------------------

    def greeting(self) -> Reply:
        return replies.GREETING.format(host=self.settings.hostname)

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
                done = self._data.feed(self._buf)
                self._buf.clear()
                if done is None:
                    break
                text, rest = done
                self._buf += rest
                out += self._end_of_data(text)
            elif self.state == BDAT_CHUNK:
                if not self._chunk.take(self._buf):
                    break
                out += self._end_of_chunk()
            else:
                line = self._next_line(out)
                if line is None:
                    break
                out += self._command(line)
        return out

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
            limit = MAX_ENVELOPE_COMMAND if self._buf[:4].upper() in (b"MAIL", b"RCPT") else MAX_COMMAND
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
        self.commands_seen += 1
        if self.commands_seen == 1 and verb in HTTP_VERBS:
            self.services.log("reject", ip=self.client.ip, conn=self.client.conn, reason="http", verb=verb)
            return self._close_with(replies.NOT_HTTP)
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
        self.state = CLOSED
        self._buf.clear()
        return [reply]

    def _reset(self) -> None:
        self.envelope = None
        self._data = None
        self._chunks = []

    def _after_queue(self, reply: Reply) -> list:
        self._reset()
        self.state = COMMAND
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
        if self.client.trusted:
            lines.append("MT-PRIORITY MIXER")  # RFC 6710 §7: the policy the levels follow
        return [replies.EHLO.format(lines="\n".join(lines))]

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
