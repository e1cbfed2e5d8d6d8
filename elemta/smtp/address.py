"""Parsing of SMTP paths and ESMTP parameters (MAIL FROM / RCPT TO arguments).

Pure functions, no I/O. Everything a client sends is checked here against
RFC 5321 §4.1.2 (with the RFC 6531 SMTPUTF8 extensions) before the session
acts on it; errors are AddressError with a `kind` the session maps to a reply
code and a short text that is safe to echo (it never contains client input).
"""

import ipaddress
import re
from dataclasses import dataclass

import idna

from elemta.errors import ElemtaError

_KINDS = frozenset({"syntax", "domain", "too_long", "utf8", "param", "unknown_param"})

# RFC 5321 §4.5.3.1.1-3 size limits, in octets of the text as sent.
_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_MAX_MAILBOX = 254  # the 256-octet path limit minus the two angle brackets

# Any non-ASCII character except lone surrogates (which are not UTF-8; they only
# appear when undecodable bytes were smuggled in with surrogateescape).
_UTF8_NON_ASCII = "\x80-\ud7ff\ue000-\U0010ffff"

# RFC 5321 §4.1.2 atext (from RFC 5322 §3.2.3); RFC 6531 §3.3 adds UTF8-non-ascii.
# Non-ASCII is always allowed by the pattern: parse_path refuses it up front
# when SMTPUTF8 was not requested.
_ATOM = "[A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _UTF8_NON_ASCII + "]+"
_DOT_STRING = re.compile(_ATOM + r"(?:\." + _ATOM + ")*")

# RFC 5321 §4.1.2: sub-domain = Let-dig [Ldh-str]; Ldh-str ends with Let-dig; at most 63
# octets (RFC 1035 §2.3.4). _LDH_NAME checks the usual all-LDH domain in one match.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LDH_LABEL = re.compile(_LABEL)
_LDH_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
# RFC 5321 §4.1.3: Standardized-tag = Ldh-str; dcontent = %d33-90 / %d94-126.
_LITERAL_TAG = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]")
_DCONTENT = re.compile(r"[\x21-\x5a\x5e-\x7e]+")
# Characters of an RFC 5321 IPv6-addr; ipaddress checks the structure but would
# also accept a '%zone' suffix, which is not part of the grammar.
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")

# RFC 5321 §4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-");
# esmtp-value = 1*(%d33-60 / %d62-126), plus UTF8-non-ascii per RFC 6531 §3.3.
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile("[\x21-\x3c\x3e-\x7e" + _UTF8_NON_ASCII + "]+")

# RFC 3461 §4.2: addr-type = atom (RFC 822 atom, ASCII only).
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_UPPER_HEX = "0123456789ABCDEF"
_SIZE = re.compile(r"[0-9]{1,20}")  # RFC 1870 §3
_MT_PRIORITY = re.compile(r"[+-]?[0-9]")  # RFC 6710 §3


class AddressError(ElemtaError, ValueError):
    """A path or parameter the client sent is unacceptable.

    kind is one of: 'syntax' (bad path/mailbox syntax), 'domain' (bad domain /
    IDNA), 'too_long' (RFC 5321 §4.5.3.1 limits), 'utf8' (non-ASCII without
    SMTPUTF8), 'param' (bad ESMTP parameter syntax or value), 'unknown_param'
    (parameter keyword not known). str(e) is a short text safe to send to the
    client.
    """

    def __init__(self, kind: str, message: str):
        if kind not in _KINDS:
            raise ValueError(f"unknown AddressError kind {kind!r}")
        # Both go to args so the exception survives pickling.
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Address:
    """A parsed mailbox; local='' and domain='' is the null reverse-path <>."""

    local: str
    domain: str
    utf8_domain: str

    @property
    def is_null(self) -> bool:
        return self.local == "" and self.domain == ""

    @property
    def needs_smtputf8(self) -> bool:
        # Only a non-ASCII local part needs SMTPUTF8 on the next hop: the
        # domain can always travel as its equivalent A-labels (RFC 5890
        # §2.3.2.1), and that is the form str() uses. Counting U-labels would make an all-ASCII
        # 'a@xn--...' envelope received without SMTPUTF8 "need" it.
        return not self.local.isascii()

    def __str__(self) -> str:
        # Kept: a transaction asks for each address several times (log lines, the queue's rows).
        # (By hand, not functools.cached_property: on Python 3.11 its first read takes a lock.)
        text = self.__dict__.get("_text")
        if text is None:
            text = self.__dict__["_text"] = self._format()
        return text

    def _format(self) -> str:
        if self.is_null:
            return ""
        if self.domain == "":
            return self.local  # only bare 'postmaster' gets here
        return _quote_local(self.local) + "@" + self.domain


def _quote_local(local: str) -> str:
    # RFC 5321 §4.1.2: a local part that is a valid Dot-string SHOULD NOT be
    # quoted; otherwise only '"' and '\' need a backslash inside the quotes.
    if _DOT_STRING.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def split_command_arg(arg: str, keyword: str) -> tuple[str, str]:
    """Split 'FROM:<path> params' into ('<path>', 'params')."""
    head = keyword + ":"
    given = arg[: len(head)]
    # isascii() first: str.upper() maps some non-ASCII letters onto ASCII ones.
    if not (given.isascii() and given.upper() == head.upper()):
        raise AddressError("syntax", f"Syntax error: expected {keyword.upper()}:<address>")
    start = len(head)
    # RFC 5321 §4.1.1.2 has no space after the colon, but enough clients send
    # one (e.g. 'MAIL FROM: <a@b>') that refusing it only hurts interoperability.
    if arg[start : start + 1] == " ":
        start += 1
    if arg[start : start + 1] != "<":
        raise AddressError("syntax", "Syntax error: address must be enclosed in <>")
    # The path ends at the first '>' outside a quoted local part (RFC 5321
    # §4.1.2 Quoted-string), so '<"a>b"@c>' is one path.  Without a quote before
    # it, that is simply the first '>'.
    end = arg.find(">", start + 1)
    quote = arg.find('"', start + 1)
    if end >= 0 and 0 <= quote < end:
        end = _path_end(arg, start + 1)
    if end < 0:
        raise AddressError("syntax", "Syntax error: address must be enclosed in <>")
    rest = arg[end + 1 :]
    # RFC 5321 §4.1.2: parameters are separated from the path by a space.
    if rest and not rest.startswith(" "):
        raise AddressError("syntax", "Syntax error: expected a space after the address")
    return arg[start : end + 1], rest.strip(" ")


def _path_end(arg: str, i: int) -> int:
    """The index of the first '>' at or after i outside a quoted string, or -1."""
    in_quote = False
    while i < len(arg):
        c = arg[i]
        if in_quote and c == "\\":
            i += 2
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return i
        i += 1
    return -1


def parse_path(path: str, *, smtputf8: bool, allow_null: bool, allow_postmaster: bool) -> Address:
    """Parse an RFC 5321 §4.1.2 Reverse-path / Forward-path, brackets included."""
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise AddressError("syntax", "Syntax error: address must be enclosed in <>")
    inner = path[1:-1]
    if not inner.isascii():
        # RFC 6531 §3.4: non-ASCII addresses only with MAIL ... SMTPUTF8.
        if not smtputf8:
            raise AddressError("utf8", "Non-ASCII address requires SMTPUTF8")
        try:
            inner.encode("utf-8")
        except UnicodeEncodeError:
            raise AddressError("syntax", "Syntax error: invalid UTF-8 in address") from None

    if inner == "":
        # RFC 5321 §4.1.1.2 / §3.6.3: the null reverse-path, MAIL FROM only.
        if allow_null:
            return Address("", "", "")
        raise AddressError("syntax", "Syntax error: null address not allowed here")

    # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain, case-insensitive
    # (§4.5.1), RCPT TO only. Normalised so callers can compare it directly.
    if inner.isascii() and inner.lower() == "postmaster":
        if allow_postmaster:
            return Address("postmaster", "", "")
        raise AddressError("syntax", "Syntax error: address needs a domain")

    mailbox = inner
    if mailbox.startswith("@"):
        # RFC 5321 §4.1.2 A-d-l = At-domain *( "," At-domain ) ":". Source
        # routes MUST be accepted and SHOULD be ignored (§4.1.1.3, Appendix C);
        # the route domains are still checked so garbage is not accepted.
        route, colon, mailbox = mailbox.partition(":")
        if not colon:
            raise AddressError("syntax", "Syntax error in source route")
        for hop in route.split(","):
            if not hop.startswith("@") or hop.startswith("@["):
                raise AddressError("syntax", "Syntax error in source route")
            _parse_domain_name(hop[1:])

    if _octets(mailbox) > _MAX_MAILBOX:
        raise AddressError("too_long", "Address too long")

    if mailbox.startswith('"'):
        local, end = _parse_quoted_string(mailbox)
        local_text, rest = mailbox[:end], mailbox[end:]
        if not rest.startswith("@"):
            raise AddressError("syntax", "Syntax error: address needs a domain")
    else:
        local_text, at, rest = mailbox.partition("@")
        if not at:
            raise AddressError("syntax", "Syntax error: address needs a domain")
        if not _DOT_STRING.fullmatch(local_text):
            raise AddressError("syntax", "Syntax error in local part")
        rest = "@" + rest
        local = local_text
    # Measured as sent, quotes and backslashes included.
    if _octets(local_text) > _MAX_LOCAL:
        raise AddressError("too_long", "Local part too long")

    domain_text = rest[1:]
    if domain_text.startswith("["):
        ascii_domain = utf8_domain = _parse_address_literal(domain_text)
    else:
        ascii_domain, utf8_domain = _parse_domain_name(domain_text)
    return Address(local, ascii_domain, utf8_domain)


def _parse_quoted_string(text: str) -> tuple[str, int]:
    """Unquote the RFC 5321 §4.1.2 Quoted-string at the start of text.

    Returns the semantic value and the index just past the closing quote.
    """
    out: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            # quoted-pairSMTP = %d92 %d32-126: ASCII only, even with SMTPUTF8.
            nxt = text[i + 1 : i + 2]
            if not nxt or not " " <= nxt <= "~":
                raise AddressError("syntax", "Syntax error in quoted local part")
            out.append(nxt)
            i += 2
            continue
        # qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii (RFC
        # 6531 §3.3); '"' and '\' were handled above.
        if not (" " <= c <= "~" or c > "\x7f"):
            raise AddressError("syntax", "Syntax error in quoted local part")
        out.append(c)
        i += 1
    raise AddressError("syntax", "Syntax error: unterminated quoted local part")


def _parse_domain_name(text: str) -> tuple[str, str]:
    """Check an RFC 5321 §4.1.2 Domain; return (A-label form, U-label form), lower-cased."""
    if text == "":
        raise AddressError("domain", "Missing domain")
    if _octets(text) > _MAX_DOMAIN:
        raise AddressError("too_long", "Domain too long")
    if _LDH_NAME.fullmatch(text):
        lower = text.lower()
        if "xn--" not in lower:  # no A-label to check: both forms are the name itself
            return lower, lower
    a_labels = []
    u_labels = []
    # Empty labels (leading, trailing or doubled dots) fail every branch below:
    # the grammar has no root dot.
    for label in text.split("."):
        if label.isascii():
            if not _LDH_LABEL.fullmatch(label):
                raise AddressError("domain", "Invalid domain name")
            a_label = label.lower()
            u_label = a_label
            if a_label.startswith("xn--"):
                # An A-label must be valid Punycode that decodes to a valid
                # IDNA 2008 U-label (RFC 5890 §2.3.2.1); idna.decode checks both.
                try:
                    u_label = idna.decode(a_label)
                except UnicodeError:
                    raise AddressError("domain", "Invalid internationalized domain name") from None
        else:
            # RFC 6531 §3.3: sub-domain =/ U-label. UTS #46 mapping folds case
            # and width so 'Bücher' is accepted as 'bücher' (as a resolver would).
            try:
                a_label = idna.encode(label, uts46=True).decode("ascii")
                u_label = idna.decode(a_label)
            except UnicodeError:
                raise AddressError("domain", "Invalid internationalized domain name") from None
            if "." in a_label:
                # UTS #46 maps dot look-alikes (U+3002 etc.) to '.', which would
                # change the structure of the name.
                raise AddressError("domain", "Invalid internationalized domain name")
        a_labels.append(a_label)
        u_labels.append(u_label)
    ascii_domain = ".".join(a_labels)
    # The A-label form is what reaches DNS and non-SMTPUTF8 hops.
    if len(ascii_domain) > _MAX_DOMAIN:
        raise AddressError("too_long", "Domain too long")
    return ascii_domain, ".".join(u_labels)


def _parse_address_literal(text: str) -> str:
    """Check an RFC 5321 §4.1.3 address-literal; return its canonical text."""
    # No length check of its own: literals only occur in a mailbox, which is
    # already limited to 254 octets.
    if not text.endswith("]"):
        raise AddressError("domain", "Invalid address literal")
    inner = text[1:-1]
    tag, colon, value = inner.partition(":")
    if not colon:
        # IPv4-address-literal: four ASCII Snum. ipaddress also refuses
        # leading zeros, which some resolvers would read as octal.
        try:
            ipaddress.IPv4Address(inner)
            return text
        except ValueError:
            raise AddressError("domain", "Invalid IPv4 address literal") from None
    if tag.isascii() and tag.lower() == "ipv6":
        # IPv6-address-literal; the tag is case-insensitive (RFC 5234 §2.3).
        if _IPV6_CHARS.fullmatch(value):
            try:
                ipaddress.IPv6Address(value)
                return "[IPv6:" + value.lower() + "]"
            except ValueError:
                pass
        raise AddressError("domain", "Invalid IPv6 address literal")
    # General-address-literal: accepted on syntax alone; whether the tag is
    # registered does not matter to us since we never route on it.
    if _LITERAL_TAG.fullmatch(tag) and _DCONTENT.fullmatch(value):
        return text
    raise AddressError("domain", "Invalid address literal")


def parse_params(rest: str, known: frozenset[str] | None = None) -> dict[str, str | None]:
    """Parse RFC 5321 §4.1.2 Mail-parameters / Rcpt-parameters.

    Returns {KEYWORD: value or None}, keywords upper-cased (they are
    case-insensitive, RFC 5321 §2.4).  With `known`, a keyword outside it raises
    'unknown_param' (the message is the keyword) before its value is looked at, so
    `RCPT TO:<a@b> SIZE=` gets 555 (unknown here) rather than 501 (bad value).
    """
    params: dict[str, str | None] = {}
    # Several spaces between parameters are tolerated; other whitespace is not
    # a separator and fails the keyword/value syntax.
    for item in rest.split(" "):
        if item == "":
            continue
        keyword, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(keyword):
            raise AddressError("param", "Syntax error in parameter keyword")
        keyword = keyword.upper()
        if known is not None and keyword not in known:
            raise AddressError("unknown_param", keyword[:32])
        if keyword in params:
            raise AddressError("param", "Duplicate parameter")
        if eq:
            if not _ESMTP_VALUE.fullmatch(value):
                raise AddressError("param", "Syntax error in parameter value")
            params[keyword] = value
        else:
            params[keyword] = None
    return params


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 §4 xtext: xchar (33-126 but '+' and '=') and '+' 2HEXDIGIT (upper case)."""
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            hexchars = value[i + 1 : i + 3]
            if len(hexchars) != 2 or any(h not in _UPPER_HEX for h in hexchars):
                raise AddressError("param", "Invalid xtext encoding")
            out.append(int(hexchars, 16))
            i += 3
            continue
        if not "!" <= c <= "~" or c == "=":
            raise AddressError("param", "Invalid character in xtext")
        out.append(ord(c))
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError("param", "Invalid xtext encoding") from None


def _is_printable_ascii(text: str) -> bool:
    # RFC 3461 §4.2 and §4.4: the decoded ORCPT address and ENVID MUST be
    # printable US-ASCII. They are copied into DSN fields (RFC 3464 §2.2.1,
    # §2.3.1), where a CR or LF would let the client inject fields.
    return all(" " <= c <= "~" for c in text)


def _require(value: str | None, keyword: str) -> str:
    if value is None:
        raise AddressError("param", f"{keyword} requires a value")
    return value


def parse_size(value: str | None) -> int:
    """RFC 1870 §3: size-value ::= 1*20DIGIT."""
    value = _require(value, "SIZE")
    if not _SIZE.fullmatch(value):
        raise AddressError("param", "Invalid SIZE value")
    return int(value)


def parse_body(value: str | None) -> str:
    """RFC 6152 §2: BODY=7BIT / 8BITMIME."""
    value = _require(value, "BODY")
    upper = value.upper() if value.isascii() else ""
    if upper == "BINARYMIME":
        # RFC 3030 BINARYMIME needs CHUNKING and is not offered in EHLO.
        raise AddressError("param", "BODY=BINARYMIME is not supported")
    if upper not in ("7BIT", "8BITMIME"):
        raise AddressError("param", "Invalid BODY value")
    return upper


def parse_ret(value: str | None) -> str:
    """RFC 3461 §4.3: RET=FULL / HDRS."""
    value = _require(value, "RET")
    upper = value.upper() if value.isascii() else ""
    if upper not in ("FULL", "HDRS"):
        raise AddressError("param", "Invalid RET value")
    return upper


def parse_envid(value: str | None) -> str:
    """RFC 3461 §4.4: ENVID=xtext, at most 100 characters, printable US-ASCII."""
    envid = xtext_decode(_require(value, "ENVID"))
    if len(envid) > 100:
        raise AddressError("param", "ENVID too long")
    if not _is_printable_ascii(envid):
        raise AddressError("param", "Invalid ENVID value")
    return envid


def parse_notify(value: str | None) -> tuple[str, ...]:
    """RFC 3461 §4.1: NOTIFY=NEVER, or a comma list of SUCCESS, FAILURE, DELAY."""
    value = _require(value, "NOTIFY")
    if not value.isascii():
        raise AddressError("param", "Invalid NOTIFY value")
    items = tuple(item.upper() for item in value.split(","))
    if items == ("NEVER",):
        return items
    if any(item not in ("SUCCESS", "FAILURE", "DELAY") for item in items):
        # Also catches NEVER combined with anything and empty items.
        raise AddressError("param", "Invalid NOTIFY value")
    if len(set(items)) != len(items):
        raise AddressError("param", "Duplicate NOTIFY keyword")
    return items


def parse_orcpt(value: str | None) -> tuple[str, str]:
    """RFC 3461 §4.2: ORCPT=addr-type ";" xtext; returns (addr-type lower-cased, address)."""
    value = _require(value, "ORCPT")
    # RFC 3461 §4.2: the ORCPT value may be up to 500 characters.
    if len(value) > 500:
        raise AddressError("param", "ORCPT too long")
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type):
        raise AddressError("param", "Invalid ORCPT value")
    address = xtext_decode(encoded)
    if address == "" or not _is_printable_ascii(address):
        raise AddressError("param", "Invalid ORCPT address")
    return addr_type.lower(), address


def parse_mt_priority(value: str | None) -> int:
    """RFC 6710 §3: MT-PRIORITY is an integer from -9 to 9, optionally signed."""
    value = _require(value, "MT-PRIORITY")
    if not _MT_PRIORITY.fullmatch(value):
        raise AddressError("param", "Invalid MT-PRIORITY value")
    return int(value)
