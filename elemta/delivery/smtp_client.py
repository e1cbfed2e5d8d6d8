"""Outbound SMTP (RFC 5321) and LMTP (RFC 2033) client on raw sockets and ssl.

One send() is one transaction: one message to several recipients at one next hop.  The
stored body is bytes with CRLF line endings, never dot-stuffed; stuffing happens here.
A connection is used by one delivery at a time.  Setting it up (connect, EHLO, STARTTLS, AUTH)
and closing it are blocking calls, made on a pool thread; a transaction is send_steps(), a
generator of its reads and writes (delivery/steps.py), which delivery/loop.py drives without
blocking and send() drives with blocking calls.

Failures of one recipient come back as RecipientResult; failures of the whole transaction
or connection raise SmtpClientError, whose try_next_host tells the caller to go on with
the next MX or address now.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time

from elemta import metrics
from elemta.config import TLS_POLICIES
from elemta.delivery import dane_openssl, smtp_tls, tlsrpt
from elemta.delivery import smtp_setup as setup
from elemta.delivery.dane import DaneCheck
from elemta.delivery.smtp_reply import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    OutboundTls,
    ProtocolError,
    RecipientResult,
    Reply,
    SmtpClientError,
    build_reply,
    dot_stuff,
    parse_ehlo,
    parse_line,
)
from elemta.delivery.smtp_transaction import Failure, OutboundTransaction, OutMessage, OutRecipient
from elemta.delivery.steps import SLOW, Read, Steps, Write, run
from elemta.sockopts import set_kernel_timeout

__all__ = ["TLS_POLICIES", "SmtpConnection", "OutMessage", "OutRecipient", "RecipientResult", "Reply",
           "SmtpClientError", "OutboundTls", "dot_stuff"]

QUIT_TIMEOUT = 5.0
# RFC 5321 §4.5.3.2.5 times each block of data, not the whole message: a large message
# on a slow link is sent in blocks, each with the command timeout.
SEND_BLOCK = 65536
RECV_SIZE = 65536


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class SmtpConnection:
    """One SMTP or LMTP session, open after SmtpConnection.open(); reusable for many send()."""

    def __init__(self, host: str, ip: str, port: int, *, lmtp: bool, command_timeout: float):
        self.host = host
        self.ip = ip
        self.port = port
        self.lmtp = lmtp
        self.command_timeout = command_timeout
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper case) -> parameters
        self.tls: OutboundTls | None = None
        self.messages_sent = 0
        self.opened_at = time.monotonic()
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._lines: list[tuple[int, bool, str]] = []  # the reply being read, its lines so far
        self._broken = False
        self._kernel = False  # timeouts kept by the kernel (see _kernel_timeouts)
        self._rcv_timeout = self._snd_timeout = 0.0  # what SO_RCVTIMEO/SO_SNDTIMEO are set to

    @classmethod
    def open(
        cls, host: str, ip: str, port: int, *, helo_name: str, lmtp: bool = False,
        tls_policy: str = "may", tls_name: str | None = None, ca_file: str | None = None,
        auth: tuple[str, str] | None = None, connect_timeout: float = 30.0,
        command_timeout: float = 300.0, unix_path: str | None = None, dane: DaneCheck | None = None,
    ) -> SmtpConnection:
        """Connect, read the greeting, EHLO/LHLO, STARTTLS per tls_policy, AUTH.

        dane: the server must match these TLSA records (RFC 7672 §3); TLS is then mandatory
        and checked by them alone, as "verify" is by the CA and the name."""
        if tls_policy not in TLS_POLICIES:
            raise ValueError(f"tls_policy must be one of {TLS_POLICIES}")
        conn = cls(host, ip, port, lmtp=lmtp, command_timeout=command_timeout)
        try:
            if unix_path:  # LMTP to a local store (Dovecot, Cyrus)
                conn._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn._sock.settimeout(connect_timeout)
                conn._sock.connect(unix_path)
            else:
                conn._sock = socket.create_connection((ip, port), timeout=connect_timeout)
            conn._kernel_timeouts()
        except OSError as exc:
            conn._abort()
            raise SmtpClientError(
                f"cannot connect: {_why(exc)}", stage="connect", try_next_host=True,
                enhanced="4.4.1", host=host, ip=ip or (unix_path or ""),
            ) from exc
        conn._check(setup.greeting(conn._read("greeting")[0]))
        conn._hello(helo_name)
        conn._starttls("verify" if dane else tls_policy, tls_name, ca_file, helo_name, dane)
        if auth is not None:
            conn._auth(*auth)
        return conn

    # -- session setup ------------------------------------------------------------------

    def _hello(self, helo_name: str) -> None:
        verb = "LHLO" if self.lmtp else "EHLO"
        self._write(f"{verb} {helo_name}\r\n".encode(), "ehlo")
        reply, lines = self._read("ehlo")
        if self._check(setup.after_ehlo(reply, verb, self.lmtp)) == "ok":
            self.extensions = parse_ehlo(lines)
            return
        self._check(setup.after_helo(self._command(f"HELO {helo_name}", "ehlo"), verb))
        self.extensions = {}

    def _starttls(self, policy: str, tls_name: str | None, ca_file: str | None,
                  helo_name: str, dane: DaneCheck | None = None) -> None:
        if self._check(setup.before_starttls(policy, self.extensions)) != "starttls":
            return
        reply = self._command("STARTTLS", "starttls")
        if self._check(setup.after_starttls(policy, reply, bool(self._buf))) != "handshake":
            return
        assert self._sock is not None  # connected: STARTTLS was just answered
        try:
            self._sock.settimeout(self.command_timeout)
            self._sock = smtp_tls.handshake(self._sock, policy, tls_name or self.host, ca_file, dane)
        except dane_openssl.DaneUnavailable as exc:
            raise self._fail("starttls", f"DANE cannot be checked here: {exc}", permanent=False,
                             try_next_host=True, enhanced="4.7.5", tls_result=tlsrpt.VALIDATION_FAILURE) from exc
        except ssl.SSLCertVerificationError as exc:
            metrics.TLS_HANDSHAKES.labels("out", "none", "unverified").inc()
            raise self._fail("starttls", f"certificate not verified: {exc.verify_message}",
                             permanent=False, try_next_host=True, enhanced="4.7.5",
                             tls_result=tlsrpt.result_for_verify_code(exc.verify_code)) from exc
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            metrics.TLS_HANDSHAKES.labels("out", "none", "failed").inc()
            # Under 'may' too: the caller retries (Postfix then falls back to plain text).
            raise self._fail("starttls", f"TLS handshake failed: {_why(exc)}",
                             permanent=False, try_next_host=True, enhanced="4.7.5",
                             tls_result=tlsrpt.VALIDATION_FAILURE) from exc
        metrics.TLS_HANDSHAKES.labels("out", self._sock.version() or "unknown", "ok").inc()
        self._kernel = False  # Python's timeout, set above, from here on: see _kernel_timeouts
        cipher = self._sock.cipher()
        matched = dane_openssl.matched(self._sock) if dane is not None else None
        self.tls = OutboundTls(self._sock.version() or "", cipher[0] if cipher else "",
                               verified=policy == "verify", dane=" ".join(map(str, matched)) if matched else "")
        # RFC 3207 §4.2: forget what the server said before TLS and ask again.
        self.extensions = {}
        self._hello(helo_name)

    def _auth(self, user: str, password: str) -> None:
        login = setup.Login(user, password, self.extensions, tls=self.tls is not None)
        line = self._check(login.first())
        while line != "done":
            line = self._check(login.next(self._command(line, "auth")))

    def _check(self, decision):
        """A setup decision (smtp_setup.py): a Failure is raised, as the next MX's business;
        anything else is handed back."""
        if isinstance(decision, Failure):
            # A required STARTTLS not offered, or refused (smtp_setup: 4.7.4), is what TLS-RPT
            # reports as starttls-not-supported.
            starttls = decision.stage in ("tls-policy", "starttls") and decision.enhanced == "4.7.4"
            raise self._fail(decision.stage, decision.reason, decision.reply, permanent=decision.permanent,
                             try_next_host=True, enhanced=decision.enhanced,
                             tls_result=tlsrpt.STARTTLS_NOT_SUPPORTED if starttls else "")
        return decision

    # -- transactions -------------------------------------------------------------------

    def send(self, message: OutMessage) -> list[RecipientResult]:
        """One transaction, on this thread; see send_steps()."""
        return run(self.send_steps(message))

    def send_steps(self, message: OutMessage) -> Steps[list[RecipientResult]]:
        """One transaction as steps (delivery/steps.py); results in the order of message.recipients.

        Refusals known before MAIL (SIZE, SMTPUTF8, BINARYMIME, unsafe address) are
        returned as permanent results for every recipient; nothing is sent.  What to send
        and what the replies mean is smtp_transaction.OutboundTransaction's; this is the I/O.
        """
        if not self.usable(probe=False):  # the pool probed it when it handed it out
            raise SmtpClientError("connection is not usable", stage="mail",
                                  try_next_host=True, enhanced="4.4.2", host=self.host,
                                  ip=self.ip)
        transaction = OutboundTransaction(message, self.extensions, self.host)
        if transaction.refusal is not None:
            return transaction.refused()
        self.messages_sent += 1
        commands = transaction.commands()
        if transaction.pipelining:
            mail, rcpts, data = yield from self._pipelined(commands)
        else:
            mail, rcpts, data = yield from self._lockstep(commands)
        after = transaction.after_data(mail, rcpts, data)
        if after.abandon or after.failure is not None:
            yield SLOW  # RSET and QUIT wait for the server: a blocking call from here
            if after.abandon:
                self._abandon(data)
            self._check(after.failure)
        finals = after.finals
        if after.send_body:
            finals = yield from self._send_body(message.body, sum(1 for r in rcpts if r.is_positive))
        return transaction.results(mail, rcpts, finals)

    def _pipelined(self, commands: list[str]) -> Steps[tuple[Reply, list[Reply], Reply | None]]:
        # RFC 2920 §3.1: MAIL, every RCPT and DATA in one write; DATA ends the group.
        # Replies come in order, each checked.
        yield Write(self, "".join(f"{c}\r\n" for c in [*commands, "DATA"]).encode(), "mail")
        mail = (yield Read(self, "mail"))[0]
        rcpts = []
        for _ in commands[1:]:
            rcpts.append((yield Read(self, "rcpt"))[0])
        return mail, rcpts, (yield Read(self, "data"))[0]

    def _lockstep(self, commands: list[str]) -> Steps[tuple[Reply, list[Reply], Reply | None]]:
        mail = yield from self._step(commands[0], "mail")
        if not mail.is_positive:
            return mail, [], None
        rcpts = []
        for command in commands[1:]:
            rcpts.append((yield from self._step(command, "rcpt")))
        data = (yield from self._step("DATA", "data")) if any(r.is_positive for r in rcpts) else None
        return mail, rcpts, data

    def _step(self, line: str, stage: str) -> Steps[Reply]:
        yield Write(self, f"{line}\r\n".encode(), stage)
        return (yield Read(self, stage))[0]

    def _send_body(self, body: bytes, accepted: int) -> Steps[list[Reply]]:
        yield Write(self, memoryview(dot_stuff(body)), "data")
        if not self.lmtp:
            return [(yield Read(self, "data"))[0]] * accepted  # one reply for all
        # RFC 2033 §4.2: LMTP answers once per accepted recipient, in RCPT order.
        replies: list[Reply] = []
        try:
            while len(replies) < accepted:
                replies.append((yield Read(self, "data"))[0])
        except SmtpClientError as exc:
            if not replies:
                raise
            # Those answered are delivered or refused for good; raising would deliver
            # them again on retry.  The others wait for the retry.
            lost = exc.reply or Reply(451, "4.4.2", exc.reason)
            replies += [lost] * (accepted - len(replies))
        return replies

    def _abandon(self, data: Reply | None) -> None:
        """End a transaction that delivers nothing; errors only make the connection unusable."""
        with contextlib.suppress(SmtpClientError):
            if data is not None and data.code == 354:
                if self.lmtp:  # RFC 2033 §4.2: DATA MUST fail then; no reply would come
                    raise self._fail("data", "DATA accepted without recipients")
                # RFC 2920 §3.1: DATA accepted although no RCPT was; end the empty message.
                self._write(b".\r\n", "data")
                self._read_reply("data")
            self.reset()

    def reset(self) -> None:
        """RSET (RFC 5321 §4.1.1.5): abort the current transaction."""
        reply = self._command("RSET", "rset")
        if not reply.is_positive:
            raise self._fail("rset", "RSET refused", reply, permanent=False,
                             try_next_host=True)

    def usable(self, probe: bool = True) -> bool:
        """Open and in step.  With probe, a poll() too: anything readable while idle (the
        server's idle-timeout 421, or its close) means the server is gone (RFC 5321
        §4.5.3.2.7); a system call, so asked where it matters: when the pool hands it out."""
        if self._sock is None or self._broken or self._buf or self._lines:
            return False
        if not probe:
            return True
        try:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        """QUIT politely with a short timeout, then close; never raises."""
        if self._sock is not None and not self._broken:
            self._broken = True
            self.command_timeout = min(self.command_timeout, QUIT_TIMEOUT)
            with contextlib.suppress(SmtpClientError):
                self._command("QUIT", "quit")
        self._abort()

    # -- I/O ------------------------------------------------------------------------------

    def _command(self, line: str, stage: str) -> Reply:
        self._write(f"{line}\r\n".encode(), stage)
        return self._read_reply(stage)

    def _kernel_timeouts(self) -> None:
        """Blocking socket, timeouts kept by the kernel (sockopts.py); not after STARTTLS,
        where only Python's own timeout ends a wait for a silent server."""
        assert self._sock is not None  # called right after the connect
        self._sock.settimeout(None)
        self._kernel = True
        self._rcv_timeout = self._set_timeout(socket.SO_RCVTIMEO, self.command_timeout)
        self._snd_timeout = self._set_timeout(socket.SO_SNDTIMEO, self.command_timeout)

    def _set_timeout(self, option: int, seconds: float) -> float:
        assert self._sock is not None  # only while the connection is open
        return set_kernel_timeout(self._sock, option, seconds)

    def write_now(self, data: bytes | memoryview, stage: str) -> None:
        """Write data on this thread, in blocks each with the command timeout."""
        for start in range(0, len(data), SEND_BLOCK):
            self._write(data[start:start + SEND_BLOCK], stage)

    def _write(self, data: bytes | memoryview, stage: str) -> None:
        if self._sock is None:
            raise self._fail(stage, "connection closed", try_next_host=True, enhanced="4.4.2")
        try:
            if not self._kernel:
                self._sock.settimeout(self.command_timeout)
            elif self._snd_timeout != self.command_timeout:  # close() shortens it for QUIT
                self._snd_timeout = self._set_timeout(socket.SO_SNDTIMEO, self.command_timeout)
            self._sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise self._lost(stage, TimeoutError("timed out")) from None
        except OSError as exc:
            raise self._lost(stage, exc) from exc

    def read_now(self, stage: str) -> tuple[Reply, list[tuple[int, bool, str]]]:
        return self._read(stage)

    def _read_reply(self, stage: str) -> Reply:
        return self._read(stage)[0]

    def _read(self, stage: str) -> tuple[Reply, list[tuple[int, bool, str]]]:
        """One reply (RFC 5321 §4.2.1), waiting on this thread; a 421 closes the connection and raises."""
        # One deadline for the whole reply, not per recv(): a server dripping one byte
        # at a time cannot hold us forever.
        got = self._reply(stage, time.monotonic() + self.command_timeout)
        assert not isinstance(got, int)  # with a deadline it waits
        return got

    def _reply(self, stage: str, deadline: float | None,
               read: bool = True) -> tuple[Reply, list[tuple[int, bool, str]]] | int:
        """The next reply, waiting until deadline for it; without one, the epoll events to wait
        for when it is not all here yet (read=False: without trying the socket first)."""
        try:
            while (got := self._take_reply()) is None:
                if deadline is not None:
                    self._fill(deadline)
                elif not read and not self._decrypted():
                    return select.EPOLLIN
                elif wait := self._recv_nowait():
                    return wait
        except ProtocolError as exc:
            raise self._fail(stage, f"protocol error: {exc}", try_next_host=True,
                             enhanced="4.5.0") from None
        except OSError as exc:
            raise self._lost(stage, exc) from exc
        if got[0].code == 421:
            # RFC 5321 §3.8: the server is closing the channel.
            raise self._fail(stage, "service not available", got[0], try_next_host=True)
        return got

    def _take_reply(self) -> tuple[Reply, list[tuple[int, bool, str]]] | None:
        """The next whole reply in the buffer, taken out of it; None while its last line has
        not arrived (the lines before it are kept)."""
        lines = self._lines
        while not lines or not lines[-1][1]:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    raise ProtocolError("reply line too long")
                return None
            if len(lines) >= MAX_REPLY_LINES:
                raise ProtocolError("reply with too many lines")
            lines.append(parse_line(bytes(self._buf[:end]).removesuffix(b"\r")))
            del self._buf[:end + 1]
        self._lines = []
        return build_reply(lines), lines

    def _fill(self, deadline: float) -> None:
        """Wait for more of the reply, until deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self._sock is None:
            raise TimeoutError("timed out")
        # The deadline holds for the whole reply; the kernel's timer is set again only
        # when it is off by more than a second (a reply in pieces, or QUIT's shorter
        # wait), so a reply may take at most a second longer than command_timeout.
        if not self._kernel:
            self._sock.settimeout(remaining)
        elif abs(remaining - self._rcv_timeout) > 1.0:
            self._rcv_timeout = self._set_timeout(socket.SO_RCVTIMEO, remaining)
        try:
            chunk = self._sock.recv(4096)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("timed out") from None
        if not chunk:
            raise ConnectionResetError("connection closed by the server")
        self._buf += chunk

    # -- I/O without waiting, for delivery/loop.py ------------------------------------------

    @property
    def sock(self) -> socket.socket | None:
        return self._sock

    def reply_nowait(self, stage: str, read: bool = True) -> tuple[Reply, list[tuple[int, bool, str]]] | int:
        """The next reply if it is all here (reading what has arrived), else the epoll events
        to wait for; raises as _read() does.  read=False right after a command was written:
        its reply cannot have come yet, so only what was read before (a pipelined group's
        replies, TLS data already decrypted) is looked at, and the socket is left to epoll."""
        return self._reply(stage, None, read)

    def _decrypted(self) -> bool:
        """Whether TLS holds data it has read and decrypted already (epoll cannot see it)."""
        return isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0

    def _recv_nowait(self) -> int:
        sock = self._sock
        if sock is None:
            raise ConnectionResetError("connection closed")
        try:
            if self._kernel:  # a plain socket in blocking mode: this call alone does not wait
                chunk = sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            else:  # TLS: ssl takes no flags; the socket itself must not wait
                sock.settimeout(0.0)
                chunk = sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            return select.EPOLLIN
        except ssl.SSLWantWriteError:  # a TLS record the peer must first get (a key update)
            return select.EPOLLOUT
        if not chunk:
            raise ConnectionResetError("connection closed by the server")
        self._buf += chunk
        return 0

    def send_nowait(self, data: memoryview, stage: str) -> tuple[int, int]:
        """(octets written, epoll events to wait for: 0 when all of data went); at most
        SEND_BLOCK at a time, so a TLS write that must be retried is retried with the same
        octets.  Raises as _write() does."""
        sock = self._sock
        if sock is None:
            raise self._fail(stage, "connection closed", try_next_host=True, enhanced="4.4.2")
        block = data[:SEND_BLOCK]
        try:
            if self._kernel:
                sent = sock.send(block, socket.MSG_DONTWAIT)
            else:
                sock.settimeout(0.0)
                sent = sock.send(block)
        except (BlockingIOError, ssl.SSLWantWriteError):
            return 0, select.EPOLLOUT
        except ssl.SSLWantReadError:
            return 0, select.EPOLLIN
        except OSError as exc:
            raise self._lost(stage, exc) from exc
        return sent, 0 if sent == len(data) else select.EPOLLOUT if sent < len(block) else 0

    def lost(self, stage: str, exc: OSError) -> SmtpClientError:
        """The error of a wait given up (the loop's timeout); the connection is closed."""
        return self._lost(stage, exc)

    def _lost(self, stage: str, exc: OSError) -> SmtpClientError:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"lost connection: {_why(exc)}"
        return self._fail(stage, reason, try_next_host=True, enhanced="4.4.2")

    def _fail(self, stage: str, reason: str, reply: Reply | None = None, *,
              permanent: bool | None = None, try_next_host: bool = False,
              enhanced: str = "", tls_result: str = "") -> SmtpClientError:
        """Close (QUIT when still in step) and build the error for the caller to raise."""
        if reply is not None and reply.code != 421:
            self.close()
        else:
            self._abort()
        return SmtpClientError(reason, stage=stage, reply=reply, permanent=permanent,
                               try_next_host=try_next_host, enhanced=enhanced,
                               host=self.host, ip=self.ip, tls_result=tls_result)

    def _abort(self) -> None:
        self._broken = True
        self._buf.clear()
        self._lines = []
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
