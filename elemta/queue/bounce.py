"""Delivery status notifications (DSNs): the report elemta mails back to a sender.

RFC 3464 defines the machine-readable message/delivery-status part, RFC 6522 the
multipart/report around it, RFC 3461 which reports a sender asked for (NOTIFY) and
how much of the message goes back (RET), RFC 6533 the internationalized forms and
RFC 3834 the Auto-Submitted field.

Everything here is a pure function of its arguments: the delivery code says what
happened and gets back the report as bytes (CRLF line endings) to enqueue with
MAIL FROM:<>. The same inputs always give the same bytes, boundary included.

Character sets: a report is 7-bit ASCII unless the original was an SMTPUTF8 message
(then UTF-8 addresses and replies are kept, in the RFC 6533 "global" media types,
only for the parts that need them) or the original itself holds 8-bit octets,
which are returned as they are. The caller sends such a report with SMTPUTF8
or BODY=8BITMIME as the bytes require. For a non-SMTPUTF8 original, non-ASCII
addresses use the RFC 6533 §3 utf-8-addr-xtext escapes and other non-ASCII
characters become "?".
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")

# RFC 3461 §4.1: the NOTIFY keyword that asks for a report with each Action.
_NOTIFY_FOR = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}

# RFC 5322 §2.1.1: a line SHOULD be at most 78 characters and MUST be at most 998
# octets. Folding aims at the first; a word longer than _CHUNK is cut so that even
# with a field name in front no line comes near the second.
_SOFT_LIMIT = 78
_CHUNK = 900
_TEXT_WIDTH = 76

_WORD = re.compile(r"[ \t]*[^ \t]+")  # a word with the white space before it
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# RFC 3461 §9.2: an SMTP reply is a 3-digit code then " " or "-" (or nothing).
_SMTP_REPLY = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")


@dataclass(frozen=True)
class RecipientStatus:
    address: str  # final recipient
    action: str  # one of ACTIONS
    status: str  # RFC 3463 code, e.g. "5.1.1", "4.4.1", "2.0.0"
    orcpt: str | None = None  # RFC 3461 ORCPT as 'type;address', e.g. 'rfc822;bob@example.org'
    remote_mta: str = ""  # host name (or [ip]) of the MTA that gave the reply, "" if none
    diagnostic: str = ""  # that MTA's reply, exactly as received (may span lines)
    last_attempt: float | None = None  # unix time
    will_retry_until: float | None = None  # unix time; used for 'delayed' only


@dataclass(frozen=True)
class OriginalMessage:
    queue_id: str
    sender: str  # '' for the null reverse-path
    arrival: float  # unix time
    envid: str | None = None  # RFC 3461 ENVID, xtext-decoded
    ret: str | None = None  # 'FULL', 'HDRS' or None
    smtputf8: bool = False
    body: bytes = b""  # the stored message, CRLF line endings
    requiretls: bool = False  # RFC 8689: the report, sent without it, returns the header only


def wants_report(notify: tuple[str, ...], action: str) -> bool:
    """Whether a recipient's NOTIFY keywords ask for a report with this Action.

    RFC 3461 §4.1: NEVER asks for none; a list asks for exactly the conditions
    it names. Without NOTIFY a failure MUST be reported (§5.2.6 (c)), success
    MUST NOT be (§5.2.3 (c)) and a delay MAY be (§5.2.5 (b)): §4.1 lets the MTA
    read a missing NOTIFY as FAILURE or as FAILURE,DELAY. elemta takes
    FAILURE,DELAY, as most MTAs do, so a sender hears about mail stuck in the
    queue before it finally bounces.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}; expected one of {', '.join(ACTIONS)}")
    keywords = {keyword.upper() for keyword in notify}
    if not keywords:
        return action in ("failed", "delayed")
    if "NEVER" in keywords:
        return False
    return _NOTIFY_FOR[action] in keywords


def build_report(
    original: OriginalMessage,
    recipients: Sequence[RecipientStatus],
    *,
    reporting_mta: str,
    now: float,
    message_id: str,
    postmaster: str | None = None,
) -> bytes:
    """The whole report message, ready to enqueue with MAIL FROM:<>.

    It goes to the original sender, or to `postmaster` when that is given. A
    message with the null sender is never reported back (RFC 3461 §5.2, RFC 5321
    §4.5.5): without `postmaster` that is a ValueError. With it, the report is
    the notice to the local postmaster that RFC 3461 §5.2 asks for, and the
    caller must still send it with MAIL FROM:<>.
    """
    if not recipients:
        raise ValueError("a delivery report needs at least one recipient")
    for rcpt in recipients:
        if rcpt.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {rcpt.action!r} for {rcpt.address!r}")
    if original.sender == "" and postmaster is None:
        raise ValueError("never bounce a bounce: the original has the null sender <>")
    to = original.sender if postmaster is None else postmaster
    utf8 = original.smtputf8 or not (to.isascii() and original.sender.isascii())
    message_id = message_id.strip().strip("<>")
    actions = {rcpt.action for rcpt in recipients}

    text = _text_part(original, recipients, reporting_mta, postmaster is not None, utf8)
    status = _status_part(original, recipients, reporting_mta, utf8)
    returned = _returned_part(original.body, _is_full(original, recipients), original.smtputf8)
    parts = [text, status, returned]

    boundary = _boundary(message_id, original.queue_id, b"".join(parts))
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    body += b"--" + boundary.encode() + b"--\r\n"

    subject = _subject(actions)
    if postmaster is not None:
        subject = "Postmaster Copy: " + subject
    header = [
        _field("From", f'"Mail Delivery System" <MAILER-DAEMON@{_clean(reporting_mta, utf8)}>'),
        _field("To", f"<{_clean(to, utf8)}>"),
        _field("Date", _date(now)),
        _field("Message-ID", f"<{_clean(message_id, utf8)}>"),
        _field("Subject", subject),
        # RFC 3834 §5: a report is an automatic response to the original message;
        # auto-responders must not answer it.
        "Auto-Submitted: auto-replied\r\n",
        "MIME-Version: 1.0\r\n",
        # RFC 6522 §3; the boundary is quoted because it holds "=" (RFC 2045 §5.1).
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"\r\n',
        # RFC 2045 §6.4: a multipart entity is labelled 7bit or 8bit, after its parts.
        f"Content-Transfer-Encoding: {_encoding(body)}\r\n",
    ]
    return "".join(header).encode("utf-8") + b"\r\n" + body


# --- the three parts -----------------------------------------------------------


def _text_part(
    original: OriginalMessage,
    recipients: Sequence[RecipientStatus],
    reporting_mta: str,
    for_postmaster: bool,
    utf8: bool,
) -> bytes:
    """RFC 6522 §3 (1): the explanation for a human reader."""
    actions = {rcpt.action for rcpt in recipients}
    whose = "The message" if for_postmaster else "Your message"
    paragraphs = [f"This is the mail system at {_clean(reporting_mta, utf8)}."]
    if for_postmaster:
        sender = _show(original.sender, utf8) if original.sender else ""
        paragraphs.append(f"This is a copy for the postmaster about a message from <{sender}>.")
    if "failed" in actions:
        paragraphs.append(
            f"{whose} could not be delivered to one or more recipients. This is a "
            "permanent error: the mail system has given up on them."
        )
    if "delayed" in actions:
        paragraphs.append(
            f"{whose} has not yet been delivered to one or more recipients. The mail "
            "system keeps trying; nothing needs to be done yet."
        )
    if actions & {"delivered", "relayed", "expanded"}:
        paragraphs.append(f"This is the delivery report requested for {whose.lower()}.")
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += [*_wrap(paragraph), ""]
    for rcpt in recipients:
        lines += _wrap(f"<{_show(rcpt.address, utf8)}>: {_explain(rcpt)}", "", "    ")
        reply = _reply_lines(rcpt.diagnostic, utf8)
        remote = _clean(rcpt.remote_mta, utf8)
        if reply:
            lines += _wrap(f"{remote} said:" if remote else "The reply was:", "    ")
            for reply_line in reply:
                lines += _wrap(reply_line, "        ")
        elif remote:
            lines += _wrap(f"(while talking to {remote})", "    ")
        lines.append("")
    returned = "message is" if _is_full(original, recipients) else "header section of the message is"
    lines += _wrap(
        f"The queue ID of the message was {_clean(original.queue_id, utf8)}. "
        f"The {returned} attached."
    )
    content = "".join(line + "\r\n" for line in lines).encode("utf-8")
    charset = "utf-8" if not content.isascii() else "us-ascii"
    return (
        f"Content-Type: text/plain; charset={charset}\r\n"
        "Content-Description: Notification\r\n"
        f"Content-Transfer-Encoding: {_encoding(content)}\r\n\r\n"
    ).encode() + content


def _explain(rcpt: RecipientStatus) -> str:
    status = _clean(rcpt.status, False)
    if rcpt.action == "failed":
        return f"delivery failed (status {status})."
    if rcpt.action == "delayed":
        until = ""
        if rcpt.will_retry_until is not None:
            until = f" until {_date(rcpt.will_retry_until)}"
        return f"delivery is delayed (status {status}); it will be retried{until}."
    if rcpt.action == "delivered":
        return f"delivered (status {status})."
    if rcpt.action == "relayed":
        # RFC 3464 §2.3.3: the next system sends no reports of its own.
        return f"relayed to a system that does not send delivery reports (status {status})."
    return f"delivered to an alias or mailing list, which passed it on (status {status})."


def _status_part(
    original: OriginalMessage,
    recipients: Sequence[RecipientStatus],
    reporting_mta: str,
    utf8: bool,
) -> bytes:
    """RFC 3464 §2.1: per-message fields, then a block of fields per recipient."""
    # RFC 3464 §2.2, in the order of its grammar.
    fields = []
    if original.envid is not None:
        # RFC 3461 §6.3 (a): the ENVID, xtext-decoded (which the caller has done).
        fields.append(_field("Original-Envelope-Id", _clean(original.envid, utf8)))
    fields.append(_field("Reporting-MTA", f"dns; {_clean(reporting_mta, utf8)}"))
    fields.append(_field("Arrival-Date", _date(original.arrival)))
    blocks = ["".join(fields)]
    for rcpt in recipients:
        # RFC 3464 §2.3, again in the grammar's order.
        fields = []
        if rcpt.orcpt is not None:
            # RFC 3461 §6.3 (d): the ORCPT value as the client gave it (decoded).
            fields.append(_field("Original-Recipient", _orcpt(rcpt.orcpt, utf8)))
        fields.append(_field("Final-Recipient", _typed_address(rcpt.address, utf8)))
        fields.append(_field("Action", rcpt.action))
        fields.append(_field("Status", _clean(rcpt.status, False)))
        if rcpt.remote_mta:
            fields.append(_field("Remote-MTA", f"dns; {_clean(rcpt.remote_mta, utf8)}"))
        reply = _reply_lines(rcpt.diagnostic, utf8)
        if reply:
            # RFC 3461 §9.2: the "smtp" type holds the reply as received, each
            # line of a multi-line reply on a continuation line of its own. A
            # text that is no SMTP reply (a local error) gets a private type.
            diagnostic_type = "smtp" if _SMTP_REPLY.match(reply[0]) else "x-elemta"
            fields.append(_field("Diagnostic-Code", reply, f"{diagnostic_type}; "))
        if rcpt.last_attempt is not None:
            fields.append(_field("Last-Attempt-Date", _date(rcpt.last_attempt)))
        if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
            fields.append(_field("Will-Retry-Until", _date(rcpt.will_retry_until)))
        blocks.append("".join(fields))
    content = "\r\n".join(blocks).encode("utf-8")
    # RFC 6533 message/global-delivery-status only where UTF-8 is really in it,
    # so that an SMTPUTF8 original with ASCII addresses gets the classic report.
    kind = "message/delivery-status" if content.isascii() else "message/global-delivery-status"
    return (
        f"Content-Type: {kind}\r\n"
        "Content-Description: Delivery report\r\n"
        f"Content-Transfer-Encoding: {_encoding(content)}\r\n\r\n"
    ).encode() + content


def _returned_part(body: bytes, full: bool, smtputf8: bool) -> bytes:
    """RFC 6522 §3 (3): the original message, or its header section only."""
    header = _header_section(body)
    # RFC 6532 §3.7 (message/global) and RFC 6533 (message/global-headers) label
    # a message whose header section is UTF-8.
    global_ = smtputf8 and not header.isascii()
    if full:
        content = body
        kind = "message/global" if global_ else "message/rfc822"
        description = "Undelivered Message"
    else:
        # RFC 6522 §4 text/rfc822-headers: the header fields, without the blank line.
        content = header
        kind = "message/global-headers" if global_ else "text/rfc822-headers"
        description = "Message Headers"
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return (
        f"Content-Type: {kind}\r\n"
        f"Content-Description: {description}\r\n"
        f"Content-Transfer-Encoding: {_encoding(content)}\r\n\r\n"
    ).encode() + content


# --- helpers -------------------------------------------------------------------


def _is_full(original: OriginalMessage, recipients: Sequence[RecipientStatus]) -> bool:
    # RFC 3461 §4.3 and §6.2: RET=FULL returns the whole message only in a report
    # of failure; any other report, and RET=HDRS or no RET, returns the header section.
    # RFC 8689 §5: a report goes back without REQUIRETLS (the return path may not offer it),
    # so the content its sender required authenticated TLS for stays out of it.
    ret = (original.ret or "").upper()
    return ret == "FULL" and not original.requiretls and any(rcpt.action == "failed" for rcpt in recipients)


def _subject(actions: set[str]) -> str:
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _field(name: str, value: str | Sequence[str], prefix: str = "") -> str:
    """A header field, folded (RFC 5322 §2.2.3, RFC 3464 §2.1.1) with CRLFs.

    `value` is one line, or several that must each start a line of their own
    (RFC 3461 §9.2). Folding only puts a CRLF in front of existing white space,
    so unfolding gives the value back exactly; only a word too long for any
    line (over 900 octets) is cut, which adds a space when unfolded.
    """
    segments = [value] if isinstance(value, str) else list(value)
    lines: list[str] = []
    for index, segment in enumerate(segments):
        line = f"{name}: {prefix}" if index == 0 else " "
        fresh = True
        for word in _WORD.findall(segment):
            for chunk in _chop(word):
                if not fresh and _octets(line) + _octets(chunk) > _SOFT_LIMIT:
                    lines.append(line)
                    # A continuation line must start with white space.
                    line = chunk if chunk[0] in " \t" else " " + chunk
                else:
                    line += chunk
                fresh = False
        lines.append(line)
    return "".join(line + "\r\n" for line in lines)


def _chop(word: str) -> list[str]:
    """The word in pieces of at most _CHUNK octets."""
    pieces = [""]
    for ch in word:
        if _octets(pieces[-1]) + _octets(ch) > _CHUNK:
            pieces.append("")
        pieces[-1] += ch
    return pieces


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _wrap(text: str, indent: str = "", hanging: str | None = None) -> list[str]:
    """Lines of at most _TEXT_WIDTH characters for the human-readable part; a
    word longer than that is cut, so no line can exceed the RFC 5322 limit."""
    return textwrap.wrap(
        text,
        _TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent if hanging is None else hanging,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def _clean(text: str, utf8: bool) -> str:
    """Text fit for one header line: control characters (CR and LF first, so no
    remote text can start a field of its own) become "?", and so does anything
    outside ASCII unless the report may carry UTF-8. Lone surrogates (from
    undecodable bytes) are never valid UTF-8."""
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif (
            ch < " "
            or "\x7f" <= ch <= "\x9f"  # DEL and the C1 controls
            or "\ud800" <= ch <= "\udfff"
            or (ch > "\x7f" and not utf8)
        ):
            out.append("?")
        else:
            out.append(ch)
    return "".join(out).strip()


def _reply_lines(diagnostic: str, utf8: bool) -> list[str]:
    """The lines of a (possibly multi-line) reply, cleaned, without empty ones."""
    lines = (_clean(line, utf8) for line in _LINE_BREAK.split(diagnostic))
    return [line for line in lines if line]


def _typed_address(address: str, utf8: bool) -> str:
    """RFC 3464 §2.3.2 address-type; value: 'rfc822; addr' when the address is
    printable ASCII (RFC 3461 §9.1), otherwise RFC 6533 §3 'utf-8; ...'."""
    if all(" " <= ch <= "~" for ch in address):
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_address(address, utf8)}"


def _orcpt(orcpt: str, utf8: bool) -> str:
    """RFC 3464 §2.3.1: the ORCPT 'type;address' as given, unless the address
    needs the RFC 6533 §3 utf-8 type."""
    addr_type, semicolon, address = orcpt.partition(";")
    if not semicolon:
        addr_type, address = "rfc822", orcpt
    addr_type = _clean(addr_type, False) or "rfc822"
    if all(" " <= ch <= "~" for ch in address):
        return f"{addr_type};{address}"
    return f"utf-8;{_utf8_address(address, utf8)}"


def _utf8_address(address: str, utf8: bool) -> str:
    """RFC 6533 §3: utf-8-addr-xtext (ASCII only, non-ASCII as \\x{HEX}) or, when
    the report may carry UTF-8, utf-8-addr-unitext (non-ASCII kept). Either way
    SP, "\\", "+", "=" and controls are escaped, as QCHAR excludes them."""
    out = []
    for ch in address:
        if "!" <= ch <= "~" and ch not in "\\+=":
            out.append(ch)
        elif ch in " \\+=\x7f" or (ch > "\x7f" and not "\ud800" <= ch <= "\udfff"):
            if ch > "\x7f" and utf8:
                out.append(ch)
            else:
                out.append(f"\\x{{{ord(ch):02X}}}")
        else:
            # Controls and lone surrogates have no valid HEXPOINT: U+FFFD instead.
            out.append("\\x{FFFD}")
    return "".join(out)


def _show(address: str, utf8: bool) -> str:
    """An address for the human-readable text."""
    if all(" " <= ch <= "~" for ch in address):
        return address
    return _utf8_address(address, utf8)


def _date(when: float) -> str:
    """RFC 5322 §3.3 date-time in UTC; email.utils spells the names, unaffected by the locale."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(int(when), datetime.UTC))


def _encoding(content: bytes) -> str:
    """RFC 2045 §6.2: 7bit for ASCII, 8bit once any octet has the high bit set."""
    return "7bit" if content.isascii() else "8bit"


def _boundary(message_id: str, queue_id: str, content: bytes) -> str:
    """A boundary derived from the IDs (so the output is deterministic) that does
    not occur in the content (RFC 2046 §5.1.1). It starts with "=_", which
    quoted-printable and base64 text can never contain."""
    seed = f"{message_id}\0{queue_id}".encode("utf-8", "surrogatepass")
    base = "=_elemta_" + hashlib.sha256(seed).hexdigest()[:32]
    candidate, n = base, 0
    while candidate.encode() in content:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def _header_section(message: bytes) -> bytes:
    """The header fields of a message, each ending in CRLF, without the blank line."""
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]
