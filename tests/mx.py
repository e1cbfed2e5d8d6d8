"""A real SMTP (or LMTP) server on loopback that plays the remote MX in delivery tests.

aiosmtpd's Controller runs it in a thread. It binds a socket on an ephemeral port itself
(aiosmtpd 1.4's Controller wants a fixed port), records every message with the bytes it
received, counts the connections that carried mail, and answers RCPT with scripted replies.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from typing import Self

from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # as received, after dot-unstuffing, CRLF line endings
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]
    session: int  # which connection carried it


class Handler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, list[str]] = {}  # address -> replies to give, in turn
        self.data_reply = "250 2.0.0 Ok: queued"
        self.data_delay = 0.0  # seconds the server takes over each message: a slow remote
        self.data_started = 0
        self._sessions: dict[int, int] = {}

    def script(self, address: str, *replies: str) -> None:
        """RCPT TO:<address> gets these replies on its next tries, then is accepted."""
        with self.lock:
            self.rcpt_replies[address.lower()] = list(replies)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            replies = self.rcpt_replies.get(address.lower())
            if replies:
                return replies.pop(0)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.data_started += 1
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self.lock:
            number = self._sessions.setdefault(id(session), len(self._sessions) + 1)
            self.messages.append(Received(
                envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content,
                tuple(envelope.mail_options), tuple(envelope.rcpt_options), number,
            ))
            reply = self.data_reply
        if isinstance(server, LMTP):
            return "\r\n".join([reply] * len(envelope.rcpt_tos))
        return reply

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def to(self, address: str) -> list[Received]:
        return [m for m in self.received() if address in m.rcpt_tos]

    def connections(self) -> int:
        with self.lock:
            return len(self._sessions)


class RequireTlsSmtp(SMTP):
    """aiosmtpd's SMTP with REQUIRETLS (RFC 8689) offered after STARTTLS: the keyword in EHLO,
    the MAIL parameter accepted (it stays in the message's mail_options)."""

    def _getparams(self, params):
        found = super()._getparams(params)
        if found is not None and self.session.ssl is not None:
            found.pop("REQUIRETLS", None)
        return found

    async def smtp_EHLO(self, hostname):
        # The keyword goes in before the last line ("250 HELP"), only over TLS.
        if self.session.ssl is not None:
            self.requiretls_offered = True
        return await super().smtp_EHLO(hostname)

    async def push(self, status):
        if getattr(self, "requiretls_offered", False) and status == "250 HELP":
            self.requiretls_offered = False
            await super().push("250-REQUIRETLS")
        return await super().push(status)


class Mx(Controller):
    """An SMTP (or LMTP) server on 127.0.0.1:<ephemeral>; by default with a recording Handler.
    requiretls: offer REQUIRETLS after STARTTLS."""

    def __init__(self, handler=None, lmtp: bool = False, requiretls: bool = False, **kwargs) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._lmtp = lmtp
        self._requiretls = requiretls
        super().__init__(handler or Handler(), hostname="127.0.0.1", port=self._sock.getsockname()[1], **kwargs)

    def factory(self):
        if self._lmtp:
            return LMTP(self.handler, **self.SMTP_kwargs)
        if self._requiretls:
            return RequireTlsSmtp(self.handler, **self.SMTP_kwargs)
        return super().factory()

    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, sock=self._sock, ssl=self.ssl_context)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
