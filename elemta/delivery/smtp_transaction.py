"""One outbound mail transaction without I/O (sans-IO): which commands a message needs at a
server that announced these EHLO keywords, and what that server's replies mean for each
recipient.

smtp_client.SmtpConnection does the socket work around it: it writes commands(), reads the
replies, asks after_data() whether to send the text, and hands every reply to results().
Everything here can be tested with plain values, and an event-driven client can drive it
the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from elemta.delivery.smtp_reply import RecipientResult, xtext
from elemta.reply import Reply

NOTIFY_KEYWORDS = ("NEVER", "SUCCESS", "FAILURE", "DELAY")  # RFC 3461 §4.1


@dataclass(frozen=True)
class OutRecipient:
    address: str
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY keywords as given; () = not given
    orcpt: str | None = None  # "rfc822;bob@example.org", already xtext-decoded


@dataclass(frozen=True)
class OutMessage:
    sender: str  # "" = null reverse-path
    recipients: tuple[OutRecipient, ...]
    body: bytes
    envid: str | None = None
    ret: str | None = None  # "FULL" | "HDRS" | None
    body_type: str = "7BIT"  # "7BIT" | "8BITMIME" | "BINARYMIME"
    smtputf8: bool = False
    requiretls: bool = False  # RFC 8689: only to a server that offers REQUIRETLS


@dataclass(frozen=True)
class Failure:
    """The whole transaction failed (the caller raises it as SmtpClientError)."""

    stage: str
    reason: str
    reply: Reply | None
    enhanced: str = ""
    permanent: bool | None = None  # None: as the reply says (a 5yz is permanent)


@dataclass(frozen=True)
class AfterData:
    """What comes after the replies to MAIL, RCPT and DATA.

    send_body: the server said 354 and at least one recipient was accepted.  Otherwise the
    transaction is ended without a message (abandon: RSET, or the lone dot RFC 2920 asks for
    when a pipelined DATA got its 354 anyway), and either failure is set (the caller raises
    it) or finals holds the final reply of each accepted recipient.
    """

    send_body: bool = False
    abandon: bool = False
    failure: Failure | None = None
    finals: list[Reply] = field(default_factory=list)


_UNSAFE = re.compile(r"[<>\x00-\x1f\x7f]")


def unsafe(address: str) -> bool:
    """An address goes between <> on a command line: no controls, no brackets, no CRLF."""
    return _UNSAFE.search(address) is not None


class OutboundTransaction:
    """One message at one server: the commands, then the meaning of the replies."""

    def __init__(self, message: OutMessage, extensions: dict[str, str], host: str):
        self.message = message
        self.extensions = extensions
        self.host = host
        addresses = [message.sender, *(r.address for r in message.recipients)]
        self.utf8 = message.smtputf8 or not all(a.isascii() for a in addresses)
        self.dsn = "DSN" in extensions
        self.pipelining = "PIPELINING" in extensions
        self.refusal = self._refusal(addresses)

    def _refusal(self, addresses: list[str]) -> Reply | None:
        """Why the server cannot take the message, known before MAIL; None if it can."""
        message = self.message
        if any(unsafe(a) for a in addresses):
            return Reply(553, "5.1.3", "address with control characters or brackets")
        if message.body_type.upper() == "BINARYMIME":
            # RFC 3030 §3: BINARYMIME goes only with BDAT, which this client does not send.
            return Reply(554, "5.6.3", "BINARYMIME content cannot be relayed")
        size = self.extensions.get("SIZE", "")
        limit = int(size) if size.isascii() and size.isdigit() else 0  # RFC 1870: 0 or none = no limit
        if limit and len(message.body) > limit:
            # RFC 1870: the server would refuse it with 552; a bounce, as in Postfix.
            return Reply(552, "5.3.4", f"message size {len(message.body)} exceeds size "
                         f"limit {limit} of server {self.host}")
        if message.requiretls and "REQUIRETLS" not in self.extensions:
            # RFC 8689 §4.2.1 (attempt.py tries the next host before it comes to this).
            return Reply(550, "5.7.30", f"REQUIRETLS is required, but was not offered by {self.host}")
        if self.utf8 and "SMTPUTF8" not in self.extensions:
            # RFC 6531 §3.5: no downgrade here, so a non-delivery report.  Codes from the
            # RFC 5248 registry (added by RFC 6531): X.6.7 for non-ASCII addresses, X.6.9
            # "UTF-8 header message cannot be transferred" when only the message needs it.
            ascii_only = all(a.isascii() for a in addresses)
            return Reply(553, "5.6.9" if ascii_only else "5.6.7",
                         f"SMTPUTF8 is required, but was not offered by {self.host}")
        return None

    def refused(self) -> list[RecipientResult]:
        """The refusal as every recipient's result (nothing was sent)."""
        assert self.refusal is not None
        return [RecipientResult(r.address, self.refusal) for r in self.message.recipients]

    def commands(self) -> list[str]:
        """MAIL, then one RCPT per recipient (DATA follows: pipelined, or once one is taken)."""
        return [self.mail_command(), *(self.rcpt_command(r) for r in self.message.recipients)]

    def mail_command(self) -> str:
        message, params = self.message, []
        if "SIZE" in self.extensions:
            # RFC 1870: the octets of the message, not counting dot-stuffing.
            params.append(f"SIZE={len(message.body)}")
        if message.body_type.upper() == "8BITMIME" and "8BITMIME" in self.extensions:
            # RFC 6152.  8-bit data to a server without 8BITMIME goes as is, without
            # BODY= (no MIME downgrade here; what Postfix and Exim do in practice).
            params.append("BODY=8BITMIME")
        if self.utf8:
            params.append("SMTPUTF8")  # RFC 6531
        if message.requiretls:
            params.append("REQUIRETLS")  # RFC 8689 §2: a MAIL parameter without a value
        if self.dsn and (message.ret or "").upper() in ("FULL", "HDRS"):
            params.append(f"RET={(message.ret or '').upper()}")  # RFC 3461 §4.3
        if self.dsn and message.envid:
            params.append(f"ENVID={xtext(message.envid)}")  # RFC 3461 §4.4
        return " ".join([f"MAIL FROM:<{message.sender}>", *params])

    def rcpt_command(self, rcpt: OutRecipient) -> str:
        params = []
        if self.dsn:  # RFC 3461 §4: only to a server that offers DSN
            notify = [k.upper() for k in rcpt.notify if k.upper() in NOTIFY_KEYWORDS]
            if notify:
                params.append("NOTIFY=" + ",".join(notify))  # §4.1
            kind, sep, original = (rcpt.orcpt or "").partition(";")
            if sep and kind and original:
                params.append(f"ORCPT={xtext(kind.strip())};{xtext(original)}")  # §4.2
        return " ".join([f"RCPT TO:<{rcpt.address}>", *params])

    def after_data(self, mail: Reply, rcpts: list[Reply], data: Reply | None) -> AfterData:
        """The replies to MAIL, each RCPT and DATA (None: DATA was not sent) -> what next."""
        if not mail.is_positive:
            if not mail.is_permanent:
                return AfterData(abandon=True, failure=Failure("mail", "sender refused", mail))
            return AfterData(abandon=True, finals=[])
        accepted = sum(1 for reply in rcpts if reply.is_positive)
        if not accepted:
            return AfterData(abandon=True)
        if data is None or data.code != 354:
            if data is None or data.is_positive:
                return AfterData(abandon=False, failure=Failure("data", "unexpected reply to DATA", data, "4.5.0"))
            return AfterData(abandon=True, finals=[data] * accepted)  # DATA refused: for every one accepted
        return AfterData(send_body=True)

    def results(self, mail: Reply, rcpts: list[Reply], finals: list[Reply]) -> list[RecipientResult]:
        """Each recipient's result, in the order of message.recipients: its RCPT reply if it was
        refused there, else the final reply for it (the DATA reply, or its own under LMTP)."""
        recipients = self.message.recipients
        if not mail.is_positive:
            return [RecipientResult(r.address, mail) for r in recipients]
        accepted = [i for i, reply in enumerate(rcpts) if reply.is_positive]
        decided = dict(zip(accepted, finals, strict=True)) if finals else {}
        return [RecipientResult(r.address, decided.get(i, rcpts[i]), self._relayed(r, decided.get(i)))
                for i, r in enumerate(recipients)]

    def _relayed(self, rcpt: OutRecipient, reply: Reply | None) -> bool:
        # RFC 3461 §5.2.2: delivered to a server without DSN, NOTIFY=SUCCESS gets a
        # "relayed" DSN from us.  (For LMTP the caller may report "delivered", §5.2.3.)
        wanted = any(k.upper() == "SUCCESS" for k in rcpt.notify)
        return bool(reply and reply.is_positive and wanted and not self.dsn)
