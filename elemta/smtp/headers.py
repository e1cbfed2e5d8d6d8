"""Header edits the core makes for the plugins: fields added at the top, fields removed, and
the one Authentication-Results field (RFC 8601).  Pure functions over the message bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

AUTH_RESULTS = b"authentication-results"


def field(name: str, value: str) -> bytes:
    """One header field with CRLF; a value already folded (CRLF + WSP) is kept as it is."""
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def authentication_results(authserv_id: str, results: Iterable[str]) -> bytes:
    """RFC 8601 §2.2: "authserv-id; method=result ...; method=result ...", one per line."""
    return field("Authentication-Results", ";\r\n\t".join([authserv_id, *results]))


def remove_fields(text: bytes, drop: Callable[[bytes, bytes], bool]) -> bytes:
    """text without the header fields for which drop(lower-case name, raw value) is true."""
    end = text.find(b"\r\n\r\n")
    head, rest = (text, b"") if end < 0 else (text[: end + 2], text[end + 2:])
    kept: list[bytes] = []
    fields: list[bytes] = []  # the lines of the field being read
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields.append(line)
            continue
        _keep(fields, kept, drop)
        fields = [line]
    _keep(fields, kept, drop)
    return b"".join(line + b"\r\n" for line in kept) + rest


def _keep(lines: list[bytes], kept: list[bytes], drop) -> None:
    if not lines:
        return
    name, colon, value = lines[0].partition(b":")
    if colon and drop(name.strip().lower(), b"\r\n".join([value, *lines[1:]])):
        return
    kept.extend(lines)


def claims_authserv_id(value: bytes, authserv_id: str) -> bool:
    """Whether an Authentication-Results value starts with authserv_id (RFC 8601 §5: an
    MTA removes such fields that come from outside, or they could forge our verdicts).
    The id may be followed by a version and comments: "mx.example.com 1 (note);"."""
    text = value.decode("ascii", "replace").replace("\r\n", " ").strip()
    first = text.split(";", 1)[0].split("(", 1)[0].split()
    return bool(first) and first[0].lower().rstrip(".") == authserv_id.lower().rstrip(".")


def has_auth_results(text: bytes) -> bool:
    end = text.find(b"\r\n\r\n")
    header = text if end < 0 else text[: end + 2]
    return AUTH_RESULTS in header.lower()
