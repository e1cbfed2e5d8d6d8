"""Transports: the text that says how mail for a domain leaves elemta.

Used by delivery.transport, local.transport and delivery.relayhost, and checked when the
configuration is loaded, so a typo is an error at start-up rather than bounced mail:

    smtp:host:port, smtp:[host]:port   connect to that host (no MX lookup); port 25 if omitted
    lmtp:host:port, lmtp:unix:/path    a mailbox server speaking LMTP (RFC 2033), e.g. Dovecot
    maildir:/path/%d/%u                write into a Maildir; %d = domain, %u = local part
    hold                               keep the mail held in the queue
    discard                            accept and drop it (logged)
    error:5.1.1 text                   fail it with this status and text (4.x.x defers)
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


@dataclass(frozen=True)
class Transport:
    kind: str  # "smtp" | "lmtp" | "maildir" | "hold" | "discard" | "error"
    host: str = ""  # smtp/lmtp over TCP
    port: int = 0
    path: str = ""  # lmtp unix socket, or maildir template
    status: str = ""  # error: the RFC 3463 status
    text: str = ""  # error: the text

    def __str__(self) -> str:
        if self.kind in ("smtp", "lmtp") and not self.path:
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{self.kind}:{host}:{self.port}"
        if self.kind == "lmtp":
            return f"lmtp:unix:{self.path}"
        if self.kind == "maildir":
            return f"maildir:{self.path}"
        if self.kind == "error":
            return f"error:{self.status} {self.text}".rstrip()
        return self.kind


def parse(text: str, *, default_port: int = 25) -> Transport:
    """Parse a transport; ValueError with a message that says what is wrong."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.lower()
    if kind in ("hold", "discard"):
        if rest:
            raise ValueError(f"{kind} takes no argument")
        return Transport(kind)
    if not sep:
        raise ValueError("expected smtp:HOST[:PORT], lmtp:HOST:PORT, lmtp:unix:PATH, maildir:PATH, "
                         "hold, discard or error:CODE TEXT")
    if kind == "error":
        status, _, why = rest.partition(" ")
        if not _STATUS.fullmatch(status):
            raise ValueError(f"error: {status!r} is not a status like 5.1.1 or 4.7.1")
        return Transport("error", status=status, text=why.strip())
    if kind == "maildir":
        if not rest.startswith("/"):
            raise ValueError("maildir: needs an absolute path, e.g. maildir:/var/mail/%d/%u")
        return Transport("maildir", path=rest)
    if kind == "lmtp" and rest[:5].lower() == "unix:":
        path = rest[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError("lmtp:unix: needs an absolute socket path")
        return Transport("lmtp", path=path)
    if kind not in ("smtp", "lmtp"):
        raise ValueError(f"unknown transport {kind!r} (smtp, lmtp, maildir, hold, discard, error)")
    host, port = split_next_hop(rest, 24 if kind == "lmtp" and default_port == 25 else default_port)
    return Transport(kind, host=host, port=port)


def split_next_hop(text: str, default_port: int = 25) -> tuple[str, int]:
    """'host', 'host:25', '[host]:25', '[2001:db8::1]:25' -> (host, port)."""
    if text.startswith("["):
        host, close, tail = text[1:].partition("]")
        if not close:
            raise ValueError(f"{text!r}: missing ']'")
        if tail and not tail.startswith(":"):
            raise ValueError(f"{text!r}: expected [HOST]:PORT")
        port_text = tail[1:]
        has_port = bool(tail)
    else:
        host, colon, port_text = text.partition(":")
        has_port = bool(colon)
        if ":" in port_text:
            raise ValueError(f"{text!r}: write IPv6 addresses in brackets, [2001:db8::1]:25")
    if not host:
        raise ValueError(f"{text!r}: no host")
    if has_port:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be 1 to 65535")
        port = int(port_text)
    else:
        port = default_port
    if not (is_ip(host) or _HOST.fullmatch(host)):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host, port


@functools.lru_cache(maxsize=1024)
def is_ip(text: str) -> bool:
    """Whether text is an IPv4 or IPv6 address (cached: asked for each host of each delivery)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
