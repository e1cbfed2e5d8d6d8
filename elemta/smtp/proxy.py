"""The PROXY protocol, versions 1 and 2, as a receiver (HAProxy's doc/proxy-protocol.txt).

A load balancer in front of elemta (HAProxy, a cloud TCP balancer) connects to us itself, so
the peer we see is the proxy; the header it sends before anything else names the client it
speaks for. Whoever sends that header chooses the address elemta logs, rate-limits and
trusts, so a listener reads it only when configured to, and only from the proxies' own
addresses: the spec (§2) forbids guessing whether a header is there.

Pure, no I/O: the server reads until parse() returns a header (with a short timeout, §2:
"at least 3 seconds"), then hands the bytes after `consumed` to the SMTP session. Anything
that cannot become a valid header is a ProxyError as soon as the bytes show it, so a client
that talks SMTP at a PROXY listener ("EHLO ...") is dropped at once rather than waited for.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # §2.1: the longest line, "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2: 12 octets, chosen to be invalid in every common protocol
V2_FIXED = 16  # signature, version/command, family/transport, 2-octet length
# §2.2 allows a length up to 65535; real headers are 12-216 octets of addresses plus a few
# TLVs (SNI, a unique ID of at most 128 octets, TLS details). A cap keeps a garbage length
# from making the server wait for, and buffer, 64 KiB.
V2_MAX_LENGTH = 2048
MAX_HEADER = V2_FIXED + V2_MAX_LENGTH  # the most bytes to read before giving up

# §2.2, 13th octet: the high nibble is the version (only 2), the low one the command.
_LOCAL, _PROXY = 0x0, 0x1
# §2.2, 14th octet: address family (high nibble) and transport (low nibble).
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2  # 0x0 is UNSPEC, as for the family
_ADDRESS_LENGTH = {_UNSPEC: 0, _INET: 12, _INET6: 36, _UNIX: 216}
_PP2_TYPE_CRC32C = 0x03  # §2.2.3

_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")  # §2.1: decimal, no leading zeros
_V1_IPV4_CHARS = re.compile(r"[0-9.]+")
# Hex groups and colons, plus dots for the dotted tail inet_ntop() prints for an IPv4-mapped
# address; no '%zone', which ipaddress would otherwise accept.
_V1_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")


class ProxyError(ValueError):
    """The bytes cannot be a valid PROXY header; str() is a short reason for the log."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    # (address, port) of the client and of the address it connected to; None for a v2 LOCAL
    # command (the proxy's own health check), v1 UNKNOWN, or a family without IP addresses:
    # then the real peer of the TCP connection is the client.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of buffer and the octets it took, or None if more are needed.

    Raises ProxyError when buffer cannot start a valid header, however many bytes follow.
    """
    data = bytes(buffer[:MAX_HEADER])
    if not data:
        return None
    if data[:1] == V1_PREFIX[:1]:
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    raise ProxyError("not a PROXY header")


# ---- version 1: one line of text -------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    head = data[:V1_MAX]
    if not head.startswith(V1_PREFIX[: len(head)]):
        raise ProxyError("not a PROXY header")
    end = head.find(b"\r\n")
    line = head if end < 0 else head[:end]
    bad = _NOT_PRINTABLE.search(line)
    # A CR as the very last octet may still be followed by its LF; any other control octet
    # (a bare CR or LF, §2.1: "must not tolerate a single CR or LF") ends it now.
    if bad and not (end < 0 and bad.start() == len(line) - 1 and line.endswith(b"\r")):
        raise ProxyError("PROXY v1: control character or bare CR/LF in the line")
    if end < 0:
        if len(head) >= V1_MAX:
            raise ProxyError(f"PROXY v1: no CRLF within {V1_MAX} octets")
        return None
    parts = line.decode("ascii").split(" ")
    protocol = parts[1]
    if protocol == "UNKNOWN":
        # §2.1: the rest of the line may be anything and is ignored; the real peer stands.
        return ProxyHeader(1, None, None), end + 2
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyError("PROXY v1: unknown protocol")
    if len(parts) != 6:
        raise ProxyError("PROXY v1: expected 4 fields after the protocol, one space apart")
    src, dst = (_v1_address(text, protocol) for text in parts[2:4])
    sport, dport = (_v1_port(text) for text in parts[4:6])
    return ProxyHeader(1, (src, sport), (dst, dport)), end + 2


def _v1_address(text: str, protocol: str) -> str:
    # §2.1: the address matches the family the protocol names; IPv4 without leading zeros
    # (ipaddress refuses them: they read as octal to some parsers).
    try:
        if protocol == "TCP4" and _V1_IPV4_CHARS.fullmatch(text):
            return str(ipaddress.IPv4Address(text))
        if protocol == "TCP6" and _V1_IPV6_CHARS.fullmatch(text):
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise ProxyError(f"PROXY v1: bad {protocol} address")


def _v1_port(text: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyError("PROXY v1: bad port")
    return int(text)


# ---- version 2: binary -----------------------------------------------------------------------


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyError("not a PROXY header")
    # Each octet is judged as soon as it is here, so a bad header fails before its body.
    if len(data) < 13:
        return None
    if data[12] >> 4 != 2:
        raise ProxyError("PROXY v2: unsupported version")
    command = data[12] & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise ProxyError("PROXY v2: unknown command")  # §2.2: "must drop connections"
    if len(data) < 14:
        return None
    family, transport = data[13] >> 4, data[13] & 0x0F
    # §2.2: LOCAL (a health check from the proxy itself) ignores the family altogether.
    if command == _PROXY and (family not in _ADDRESS_LENGTH or transport > _DGRAM):
        raise ProxyError("PROXY v2: unknown address family or transport")
    if command == _PROXY and transport == _DGRAM and family != _UNSPEC:
        raise ProxyError("PROXY v2: not a stream connection")  # SMTP runs over TCP
    if len(data) < V2_FIXED:
        return None
    length = int.from_bytes(data[14:16], "big")
    if length > V2_MAX_LENGTH:
        raise ProxyError(f"PROXY v2: header longer than {V2_MAX_LENGTH} octets")
    address_length = _ADDRESS_LENGTH[family] if command == _PROXY else 0
    if length < address_length:
        raise ProxyError("PROXY v2: too short for its address family")
    total = V2_FIXED + length
    if len(data) < total:
        return None
    header = data[:total]
    if command == _LOCAL:
        # §2.2: "must use the real connection endpoints and discard the protocol block".
        return ProxyHeader(2, None, None), total
    if family == _UNSPEC:
        # §2.2: an unspecified family: use the real endpoints and ignore the block, whose
        # layout is unknown (so its TLVs cannot be found either).
        return ProxyHeader(2, None, None), total
    _check_tlvs(header, V2_FIXED + address_length)
    if transport == 0 or family == _UNIX:
        # An unspecified transport is treated like the family above; a UNIX socket path
        # names no client we could log, limit or trust: the real peer stands.
        return ProxyHeader(2, None, None), total
    size = 4 if family == _INET else 16
    block = header[V2_FIXED:]
    make = ipaddress.IPv4Address if family == _INET else ipaddress.IPv6Address
    src, dst = str(make(block[:size])), str(make(block[size : 2 * size]))
    sport = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    return ProxyHeader(2, (src, sport), (dst, dport)), total


def _check_tlvs(header: bytes, start: int) -> None:
    """The TLVs after the addresses (§2.2) must fit the header; a CRC32C one must match.

    Their contents are not needed here (SNI, TLS details, IDs), but a TLV running past the
    end means the length field or the sender is broken, and §2.2.3 says a header whose
    checksum does not match MUST be treated as invalid.
    """
    i = start
    while i < len(header):
        if len(header) - i < 3:
            raise ProxyError("PROXY v2: truncated TLV")
        kind, size = header[i], int.from_bytes(header[i + 1 : i + 3], "big")
        value_start, end = i + 3, i + 3 + size
        if end > len(header):
            raise ProxyError("PROXY v2: truncated TLV")
        if kind == _PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyError("PROXY v2: bad CRC32C TLV")
            # §2.2.3: the checksum of the whole header with its own field set to zeros.
            zeroed = header[:value_start] + bytes(4) + header[end:]
            if crc32c(zeroed) != int.from_bytes(header[value_start:end], "big"):
                raise ProxyError("PROXY v2: CRC32C mismatch")
        i = end


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) as in RFC 4960 Appendix B, which §2.2.3 names."""
    crc = 0xFFFFFFFF
    for octet in data:
        crc = _CRC32C_TABLE[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
