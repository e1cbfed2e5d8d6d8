"""The envelope of one SMTP transaction: MAIL/RCPT parameters and the Received trace field.

Pure functions over parsed values; smtp/session.py decides when they run and what to reply.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
from dataclasses import dataclass, field

from elemta.queue.model import NewRecipient
from elemta.smtp import address as addr

_NOT_VISIBLE = re.compile(r"[^\x21-\x7e]")  # anything but visible ASCII
MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "MT-PRIORITY", "AUTH", "REQUIRETLS"})
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


class TooBig(Exception):
    """MAIL ... SIZE=n declares more than the limit (RFC 1870 §6.2: 552 5.3.4)."""


@dataclass
class Envelope:
    sender: addr.Address
    queue_id: str = ""
    body_type: str = "7BIT"
    smtputf8: bool = False
    requiretls: bool = False  # RFC 8689: relay only over authenticated TLS
    priority: str = "normal"
    ret: str | None = None
    envid: str | None = None
    recipients: list[NewRecipient] = field(default_factory=list)

    def add_recipient(self, rcpt: NewRecipient) -> None:
        """Keep one row per distinct recipient; a repeated RCPT is acknowledged, not doubled."""
        if all(r.address != rcpt.address for r in self.recipients):
            self.recipients.append(rcpt)


def mt_priority_class(level: int) -> str:
    """RFC 6710 §3 levels (-9..9) onto elemta's four queue priorities."""
    if level >= 5:
        return "critical"
    if level >= 1:
        return "high"
    if level >= 0:
        return "normal"
    return "low"


def from_mail(sender: addr.Address, params: dict, *, max_size: int, trusted: bool) -> Envelope:
    """An envelope from MAIL's parameters; AddressError for a bad value, TooBig for SIZE."""
    envelope = Envelope(sender=sender)
    for name, value in params.items():
        if name == "SIZE":
            if addr.parse_size(value) > max_size:
                raise TooBig()
        elif name == "BODY":
            envelope.body_type = addr.parse_body(value)
        elif name == "SMTPUTF8":
            if value is not None:
                raise addr.AddressError("param", "SMTPUTF8 takes no value")
            envelope.smtputf8 = True
        elif name == "REQUIRETLS":  # RFC 8689 §2: no value; the session checks TLS is up
            if value is not None:
                raise addr.AddressError("param", "REQUIRETLS takes no value")
            envelope.requiretls = True
        elif name == "RET":
            envelope.ret = addr.parse_ret(value)
        elif name == "ENVID":
            envelope.envid = addr.parse_envid(value)
        elif name == "AUTH":
            # RFC 4954 §5: the identity a relaying client vouches for.  elemta passes no
            # identity on, so it is checked as xtext and otherwise ignored.
            if value is None:
                raise addr.AddressError("param", "AUTH needs a value")
            addr.xtext_decode(value)
        else:  # MT-PRIORITY
            level = addr.parse_mt_priority(value)
            # RFC 6710 §5: priorities are honoured only from clients we trust; from others
            # the parameter is accepted and ignored.
            if trusted:
                envelope.priority = mt_priority_class(level)
    return envelope


def recipient(rcpt: addr.Address, params: dict) -> NewRecipient:
    """A queue recipient from RCPT's DSN parameters (RFC 3461 §4.1-4.2)."""
    orcpt: str | None = None
    notify: tuple[str, ...] = ()
    for name, value in params.items():
        if name == "NOTIFY":
            notify = addr.parse_notify(value)
        else:  # ORCPT
            orcpt = ";".join(addr.parse_orcpt(value))
    return NewRecipient(str(rcpt), orcpt, notify)


def received_header(
    envelope: Envelope, *, helo: str, client_ip: str, esmtp: bool, hostname: str, now: float,
    tls: object | None = None, authenticated: bool = False,
) -> bytes:
    """RFC 5321 §4.4 trace field; protocol names from RFC 3848 and RFC 6531 §3.7.3.

    tls (a TlsInfo) adds the version and cipher as a comment, as Postfix writes it; the
    authenticated user's name is left out (it is the user's, not the world's, to know).
    """
    # SMTPUTF8 needs EHLO, so a UTF8 transaction is always ESMTP: its registered name is UTF8SMTP.
    protocol = "UTF8SMTP" if envelope.smtputf8 else ("ESMTP" if esmtp else "SMTP")
    if esmtp and (tls or authenticated):  # RFC 3848 §1: ESMTPS, ESMTPA, ESMTPSA (and UTF8SMTP...)
        protocol += ("S" if tls else "") + ("A" if authenticated else "")
    literal = _address_literal(client_ip)
    # The HELO name is the client's word: keep it printable ASCII and short.
    helo = _NOT_VISIBLE.sub("?", helo)[:255]
    header = (
        f"Received: from {helo} ({literal})\r\n"
        + (f"\t(using {tls})\r\n" if tls else "")
        + f"\tby {hostname} (elemta) with {protocol} id {envelope.queue_id}"
    )
    if len(envelope.recipients) == 1:  # naming one recipient leaks nothing about others
        header += f"\r\n\tfor <{envelope.recipients[0].address}>"
    header += f";\r\n\t{date_field(now)}\r\n"
    return header.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=1024)
def _address_literal(client_ip: str) -> str:
    """RFC 5321 §4.1.3's address literal; cached, as a busy client comes back many times."""
    ip = ipaddress.ip_address(client_ip)
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


_date_second: tuple[int, str] = (-1, "")


def date_field(now: float) -> str:
    """The RFC 5322 §3.3 date-time of `now` in local time, as in a Received or Date field;
    formatted once a second (formatdate costs more than the rest of the Received field)."""
    global _date_second
    second, text = _date_second
    if int(now) != second:  # a race only formats the same second twice
        text = email.utils.formatdate(int(now), localtime=True)
        _date_second = (int(now), text)
    return text
