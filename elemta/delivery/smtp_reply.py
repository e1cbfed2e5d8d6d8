"""The wire format of the outbound SMTP/LMTP client: replies, EHLO keywords, errors, DATA text.

Kept apart from smtp_client.py so the parsing rules can be tested with plain bytes.  A
remote's reply becomes elemta.reply.Reply, the type the server's own replies and the plugins'
refusals have too; the client re-exports it and SmtpClientError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from elemta.errors import ElemtaError
from elemta.reply import Reply

# RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers send longer text, so
# the limit is generous, but it stays a limit: a hostile server must not fill our memory.
MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100

# RFC 5321 §4.2: Reply-code ( "-" / SP ) textstring, or the bare code.  The first digit is
# 2 to 5 (§4.2.1; 1yz is not used in SMTP).  Anything else is a protocol error.
_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?")
# RFC 3463 §2: class "." subject "." detail, at the start of the text (RFC 2034 §3).
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")


@dataclass(frozen=True)
class RecipientResult:
    address: str
    reply: Reply  # the RCPT reply if refused there, else the MAIL, DATA or LMTP reply
    relayed: bool = False  # NOTIFY=SUCCESS asked, remote has no DSN (RFC 3461 §5.2.2)

    @property
    def is_positive(self) -> bool:
        return self.reply.is_positive

    @property
    def is_permanent(self) -> bool:
        return self.reply.is_permanent

    @property
    def is_transient(self) -> bool:
        """Anything neither positive nor permanent is tried again (a 3yz here is no answer)."""
        return not (self.reply.is_positive or self.reply.is_permanent)


@dataclass(frozen=True)
class OutboundTls:
    version: str
    cipher: str
    verified: bool
    dane: str = ""  # the TLSA record that authenticated the server ("3 1 1"), if DANE did

    def __str__(self) -> str:
        return f"{self.version} {self.cipher}" + (f" (DANE {self.dane})" if self.dane else "")


class ProtocolError(ValueError):
    """The remote sent something that is not an SMTP reply."""


def parse_line(raw: bytes) -> tuple[int, bool, str]:
    """One reply line without its line ending -> (code, is_last, text)."""
    if len(raw) > MAX_REPLY_LINE:
        raise ProtocolError("reply line too long")
    match = _LINE.fullmatch(raw)
    if match is None:
        raise ProtocolError(f"not an SMTP reply: {_printable(raw[:80])!r}")
    code, sep, text = match.groups()
    return int(code), sep != b"-", _printable(text or b"")


def build_reply(lines: list[tuple[int, bool, str]]) -> Reply:
    """The lines of one multi-line reply (RFC 5321 §4.2.1) -> Reply.

    Every line must carry the same code.  The enhanced code is taken from the first line
    only when its class matches the reply's first digit (RFC 3463 §2); RFC 2034 §3 repeats
    it on every line, so it is stripped from the other lines' text too.
    """
    if len(lines) == 1:  # nearly every reply but EHLO's: the same as the loop below, for one line
        code, _, text = lines[0]
        match = _ENHANCED.match(text)
        if match and match.group(1) == str(code)[0]:
            return Reply(code, ".".join(match.groups()), text[match.end():])
        return Reply(code, "", text)
    code = lines[0][0]
    if any(line[0] != code for line in lines):
        raise ProtocolError("reply lines with different codes")
    enhanced = ""
    match = _ENHANCED.match(lines[0][2])
    if match and match.group(1) == str(code)[0]:
        enhanced = ".".join(match.groups())
    texts = []
    for _, _, text in lines:
        match = _ENHANCED.match(text)
        if enhanced and match and ".".join(match.groups()) == enhanced:
            text = text[match.end():]
        texts.append(text)
    return Reply(code, enhanced, " ".join(t for t in texts if t))


def parse_ehlo(lines: list[tuple[int, bool, str]]) -> dict[str, str]:
    """EHLO reply lines (RFC 5321 §4.1.1.1): the first is the greeting, each other line one
    keyword and its parameters.  Keywords are upper-cased; parameters kept as sent."""
    extensions = {}
    for _, _, line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def xtext(value: str) -> str:
    """RFC 3461 §4: printable ASCII but '+' and '=' as is, every other octet as +XX."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8")
    )


def _printable(raw: bytes) -> str:
    # Reply text ends up in logs and DSNs: no control characters from a remote server.
    text = raw.decode("utf-8", "replace")
    if text.isprintable():  # nearly always: no copy character by character
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


class SmtpClientError(ElemtaError):
    """A failure of the whole transaction or connection, not of one recipient.

    stage: where it happened ('connect', 'greeting', 'ehlo', 'starttls', 'tls-policy',
    'auth', 'mail', 'rcpt', 'data', 'rset').  permanent: the next attempt will fail the
    same way (a 5xx); try_next_host: the caller should go on with the next MX/IP now.
    """

    def __init__(
        self,
        reason: str,
        *,
        stage: str,
        reply: Reply | None = None,
        permanent: bool | None = None,
        try_next_host: bool = False,
        enhanced: str = "",
        host: str = "",
        ip: str = "",
        tls_result: str = "",
    ):
        self.reason = reason
        self.tls_result = tls_result  # a TLS failure's RFC 8460 result-type (tlsrpt.py), else ""
        self.stage = stage
        self.reply = reply
        self.permanent = reply.is_permanent if permanent is None and reply else bool(permanent)
        self.try_next_host = try_next_host
        default = "5.0.0" if self.permanent else "4.0.0"
        self.enhanced = enhanced or (reply.enhanced if reply else "") or default
        self.host = host
        self.ip = ip
        where = f"{host}[{ip}]" if ip else host
        said = f": {reply}" if reply else ""
        super().__init__(f"{where} {stage}: {reason}{said}".strip())


def dot_stuff(body: bytes) -> bytes:
    """The DATA text for a CRLF body: RFC 5321 §4.5.2 transparency, then CRLF.CRLF."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"  # §4.1.1.4: the terminator starts on a line of its own
    return stuffed + b".\r\n"
