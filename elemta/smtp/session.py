"""The SMTP server session as a pure state machine (sans-IO).

Bytes go in through feed(); a list of outputs comes back: Reply objects to send in order and,
at the end of a message, one Enqueue.  The caller (smtp/server.py) stores the message and hands
the outcome back with enqueued() / enqueue_failed(), which gives the final reply.  Nothing here
touches a socket or the disk, so every rule is unit-testable with plain bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from elemta import log as logmod
from elemta.errors import QueueFullError
from elemta.local import LocalRecipients
from elemta.queue.model import NewMessage
from elemta.smtp import address as addr
from elemta.smtp import dotreader, replies
from elemta.smtp import envelope as env
from elemta.smtp.replies import Reply

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.  MAIL and RCPT
# may be longer by what their extensions add (RFC 1870 §3: SIZE +26; RFC 3461 §4: +100 on
# MAIL, +500 on RCPT; RFC 6710: MT-PRIORITY +16), so they get 1,024.
MAX_COMMAND = 512
MAX_ENVELOPE_COMMAND = 1024

HTTP_VERBS = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT"})
COMMANDS = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP")


@dataclass(frozen=True)
class Enqueue:
    """Output: store this message, then call enqueued() or enqueue_failed()."""

    message: NewMessage


@dataclass(frozen=True)
class Settings:
    """What a session needs from the configuration; built once per listener, not per client."""

    hostname: str
    role: str = "mx"  # "mx" or "submission"
    listener: str = ""
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_errors: int = 20
    max_received_headers: int = 50
    local_domains: frozenset[str] = frozenset()
    relay_domains: frozenset[str] = frozenset()
    auth_required: bool = True
    accept_all: bool = False  # dev mode: every recipient is accepted
    recipients: LocalRecipients | None = None  # who exists in local_domains; None = everyone
    hold: bool = False  # new mail starts held in the queue


@dataclass(frozen=True)
class Client:
    ip: str
    port: int = 0
    trusted: bool = False  # from a trusted network (smtp.trusted_networks)
    conn: int = 0  # the connection's number in the log (connect ... disconnect)


@dataclass(frozen=True)
class Services:
    """What the session asks of the rest of elemta; plain callables, no I/O of its own."""

    new_id: Callable[[], str]
    intake_check: Callable[[], str | None] = lambda: None  # None, or why mail can't be taken now
    log: Callable[..., None] = lambda event, **fields: None  # log(event, qid=..., key=value)
    now: Callable[[], float] = time.time


# Session states
COMMAND, DATA, BDAT_CHUNK, WAIT_QUEUE, CLOSED = range(5)


class Session:
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

    def enqueued(self, message: NewMessage) -> list:
        """The queue committed message: the 250 that promises it."""
        queue_id = message.queue_id
        self.services.log(
            "queued", qid=queue_id, size=len(message.body), nrcpt=len(message.recipients),
            priority=message.priority, state="held" if message.hold else "queued",
        )
        return self._after_queue(replies.QUEUED.format(queue_id=queue_id))

    def enqueue_failed(self, error: Exception) -> list:
        reply = replies.NO_STORAGE if isinstance(error, QueueFullError) else replies.QUEUE_FAILED
        qid = self.envelope.queue_id if self.envelope else None
        self.services.log(
            "queue_error", qid=qid, level=logmod.WARNING, error=str(error) or type(error).__name__
        )
        return self._after_queue(reply)

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

    def _mail(self, arg: str) -> list:
        if self.helo is None:
            return self._sequence("send HELO/EHLO first")
        if self.envelope is not None:
            return self._sequence("nested MAIL command")
        try:
            path, rest = addr.split_command_arg(arg, "FROM")
            params = addr.parse_params(rest, env.MAIL_PARAMS)
            if params and not self.esmtp:
                raise addr.AddressError("param", "parameters need EHLO")
            smtputf8 = "SMTPUTF8" in params
            sender = addr.parse_path(path, smtputf8=smtputf8, allow_null=True, allow_postmaster=False)
            envelope = env.from_mail(
                sender, params, max_size=self.settings.max_message_size, trusted=self.client.trusted
            )
        except addr.AddressError as exc:
            return self._address_error(exc, replies.BAD_SENDER)
        except env.TooBig:
            return self._error(replies.SIZE_EXCEEDED.format(limit=self.settings.max_message_size))
        submission_locked = self.settings.role == "submission" and self.settings.auth_required
        if submission_locked and not (self.client.trusted or self.settings.accept_all):
            return self._error(replies.AUTH_REQUIRED)
        why = self.services.intake_check()
        if why is not None:
            self.services.log("reject", ip=self.client.ip, conn=self.client.conn, reason=why, reply="452 4.3.1")
            return [replies.NO_STORAGE]
        envelope.queue_id = self.services.new_id()  # as Postfix, the ID exists from MAIL on
        self.envelope = envelope
        self.services.log(
            "mail", qid=envelope.queue_id, ip=self.client.ip, conn=self.client.conn, sender=f"<{sender}>",
            size=params.get("SIZE") or "-", body=envelope.body_type,
        )
        return [replies.SENDER_OK]

    def _address_error(self, exc: addr.AddressError, syntax_reply: Reply) -> list:
        if exc.kind == "utf8":
            return self._error(replies.UTF8_REQUIRED)
        if exc.kind == "unknown_param":
            return self._error(replies.UNKNOWN_PARAMETER.format(name=str(exc)[:32]))
        if exc.kind == "param":
            return self._error(replies.BAD_PARAMETER.format(why=str(exc)))
        return self._error(syntax_reply.format(why=str(exc)))

    def _rcpt(self, arg: str) -> list:
        if self.envelope is None:
            return self._sequence("send MAIL first")
        if len(self.envelope.recipients) >= self.settings.max_recipients:
            return [replies.TOO_MANY_RECIPIENTS]
        try:
            path, rest = addr.split_command_arg(arg, "TO")
            params = addr.parse_params(rest, env.RCPT_PARAMS)
            if params and not self.esmtp:
                raise addr.AddressError("param", "parameters need EHLO")
            rcpt = addr.parse_path(
                path, smtputf8=self.envelope.smtputf8, allow_null=False, allow_postmaster=True
            )
            new_rcpt = env.recipient(rcpt, params)
        except addr.AddressError as exc:
            return self._address_error(exc, replies.BAD_RECIPIENT)
        table = self.settings.recipients
        unknown = table is not None and not self.settings.accept_all and not table.accepts(str(rcpt))
        refusal = replies.RELAY_DENIED if not self._may_receive(rcpt) else replies.NO_SUCH_USER if unknown else None
        if refusal is not None:
            self.services.log("reject", qid=self.envelope.queue_id, ip=self.client.ip, conn=self.client.conn,
                              rcpt=f"<{rcpt}>", reply=f"{refusal.code} {refusal.esc}")
            return self._error(refusal)
        self.envelope.add_recipient(new_rcpt)
        self.services.log("rcpt", qid=self.envelope.queue_id, rcpt=f"<{rcpt}>")
        return [replies.RCPT_OK]

    def _may_receive(self, rcpt: addr.Address) -> bool:
        """Relay control: who may send to this recipient through this listener."""
        if self.settings.accept_all or self.client.trusted or not rcpt.domain:
            return True  # not rcpt.domain: the bare <postmaster> of RFC 5321 §4.1.1.3
        if self.settings.role == "submission":
            return not self.settings.auth_required
        domain = rcpt.domain
        if domain in self.settings.local_domains or domain in self.settings.relay_domains:
            return True
        # ".example.org" in relay_domains covers every subdomain of example.org.
        return any(domain.endswith(d) for d in self.settings.relay_domains if d.startswith("."))

    def _data_cmd(self, arg: str) -> list:
        if arg:
            return self._syntax("DATA")
        problem = self._transaction_problem()
        if problem:
            return self._sequence(problem)
        if self._chunks:
            return self._sequence("DATA after BDAT")
        if self._buf:
            # RFC 2920 §3.1: DATA ends a pipelined group; text sent before the 354 means the
            # client is not waiting for replies, so nothing it sends can be trusted as a message.
            return self.input_before_reply()
        self.state = DATA
        self._data = dotreader.DataReader(self.settings.max_message_size)
        return [replies.START_DATA]

    def _transaction_problem(self) -> str | None:
        if self.helo is None:
            return "send HELO/EHLO first"
        if self.envelope is None:
            return "send MAIL first"
        if not self.envelope.recipients:
            return "send RCPT first"
        return None

    def _end_of_data(self, text: bytes) -> list:
        self.state = COMMAND
        if self._data.too_big:
            self._log_refusal("552 5.3.4", size=self._data.received)
            self._reset()
            return self._error(replies.SIZE_EXCEEDED.format(limit=self.settings.max_message_size))
        return self._finish(dotreader.unstuff(text))

    # BDAT (RFC 3030): the chunk's octets follow the command line; they are data, never
    # commands, whatever the state of the transaction, so they are always read in full.
    def _bdat(self, arg: str) -> list:
        parts = arg.split(" ")
        if not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            return self._syntax("BDAT size [LAST]")
        size, problem = int(parts[0]), self._transaction_problem()
        refusal = replies.BAD_SEQUENCE.format(why=problem) if problem else None
        if refusal is None and sum(map(len, self._chunks)) + size > self.settings.max_message_size:
            refusal = replies.SIZE_EXCEEDED.format(limit=self.settings.max_message_size)
        self._chunk = dotreader.Chunk(size, last=len(parts) == 2, refusal=refusal)
        self.state = BDAT_CHUNK
        return []

    def _end_of_chunk(self) -> list:
        self.state = COMMAND
        chunk, self._chunk = self._chunk, None
        if chunk.refusal is not None:
            if chunk.refusal.code == 552:
                self._log_refusal("552 5.3.4")
                self._reset()
            return self._error(chunk.refusal)
        self._chunks.append(chunk.data())
        if not chunk.last:
            return [replies.CHUNK_OK.format(size=len(self._chunks[-1]))]
        text = b"".join(self._chunks)
        self._chunks = []
        return self._finish(text)

    def _finish(self, text: bytes) -> list:
        """The whole message text is here: check it, add Received, hand it to the queue."""
        refusal = dotreader.check_text(text)
        if refusal is None:
            hops = dotreader.count_received(text)
            if hops >= self.settings.max_received_headers:
                refusal = replies.LOOP.format(count=hops)
        if refusal is not None:
            self._log_refusal(f"{refusal.code} {refusal.esc}")
            self._reset()
            return self._error(refusal)
        envelope = self.envelope
        message = NewMessage(
            queue_id=envelope.queue_id,
            sender=str(envelope.sender),
            recipients=tuple(envelope.recipients),
            body=env.received_header(
                envelope, helo=self.helo or "", client_ip=self.client.ip, esmtp=self.esmtp,
                hostname=self.settings.hostname, now=self.services.now(),
            ) + text,
            priority=envelope.priority,
            hold=self.settings.hold,
            envid=envelope.envid,
            ret=envelope.ret,
            body_type=envelope.body_type,
            smtputf8=envelope.smtputf8,
            client_ip=self.client.ip,
            client_helo=self.helo or "",
            listener=self.settings.listener,
            received_at=self.services.now(),
        )
        self.state = WAIT_QUEUE
        return [Enqueue(message)]

    def _log_refusal(self, reply: str, **fields) -> None:
        qid = self.envelope.queue_id if self.envelope else None
        self.services.log("reject", qid=qid, ip=self.client.ip, conn=self.client.conn, reply=reply, **fields)

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
