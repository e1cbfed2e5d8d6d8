"""elemta.smtp.proxy: PROXY protocol v1 and v2 headers, fed whole, in pieces, or wrong."""

from __future__ import annotations

import ipaddress
import random

import pytest

from elemta.smtp import proxy
from elemta.smtp.proxy import MAX_HEADER, ProxyError, ProxyHeader, parse

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
SMTP = b"EHLO client.example\r\n"


def v2(ver_cmd: int, fam: int, body: bytes = b"", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def inet(src="192.0.2.1", dst="198.51.100.2", sport=56324, dport=25) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


def inet6(src="2001:db8::1", dst="2001:db8::25", sport=40000, dport=587) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def with_crc(ver_cmd: int, fam: int, body: bytes, corrupt: bool = False) -> bytes:
    """A v2 header whose last TLV is a CRC32C over the whole header (§2.2.3)."""
    header = v2(ver_cmd, fam, body + tlv(0x03, bytes(4)))
    crc = proxy.crc32c(header) ^ (1 if corrupt else 0)
    return header[:-4] + crc.to_bytes(4, "big")


V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
V1_TCP6_LONGEST = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                   b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe 65535 65535\r\n")
V1_UNKNOWN_LONGEST = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                      b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
V2_TCP4 = v2(0x21, 0x11, inet())

VALID = {
    "v1 tcp4": (V1_TCP4, ProxyHeader(1, ("192.0.2.1", 56324), ("198.51.100.2", 25))),
    "v1 tcp6": (b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 587\r\n",
                ProxyHeader(1, ("2001:db8::1", 40000), ("2001:db8::25", 587))),
    "v1 tcp6 written long and upper case": (
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 2001:db8::2 1 2\r\n",
        ProxyHeader(1, ("2001:db8::1", 1), ("2001:db8::2", 2))),
    "v1 tcp6 ipv4-mapped, as inet_ntop prints it": (
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
        ProxyHeader(1, (str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 1), ("::1", 2))),
    "v1 tcp6 longest (104 octets)": (
        V1_TCP6_LONGEST,
        ProxyHeader(1, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535))),
    "v1 ports 0 and 65535": (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
                             ProxyHeader(1, ("0.0.0.0", 0), ("255.255.255.255", 65535))),
    "v1 unknown, short form": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
    "v1 unknown, rest ignored": (b"PROXY UNKNOWN whatever is here 1 2\r\n", ProxyHeader(1, None, None)),
    "v1 unknown, worst case of 107 octets": (V1_UNKNOWN_LONGEST, ProxyHeader(1, None, None)),
    "v2 proxy tcp4": (V2_TCP4, ProxyHeader(2, ("192.0.2.1", 56324), ("198.51.100.2", 25))),
    "v2 proxy tcp6": (v2(0x21, 0x21, inet6()), ProxyHeader(2, ("2001:db8::1", 40000), ("2001:db8::25", 587))),
    "v2 local, no address": (v2(0x20, 0x00), ProxyHeader(2, None, None)),
    "v2 local with an address block, ignored": (v2(0x20, 0x11, inet()), ProxyHeader(2, None, None)),
    "v2 local ignores even a nonsense family": (v2(0x20, 0xFF, b"abc"), ProxyHeader(2, None, None)),
    "v2 proxy unspec: use the real peer": (v2(0x21, 0x00), ProxyHeader(2, None, None)),
    "v2 proxy unspec, a block it cannot read": (v2(0x21, 0x00, b"\x01\x02"), ProxyHeader(2, None, None)),
    "v2 proxy inet with unspec transport": (v2(0x21, 0x10, inet()), ProxyHeader(2, None, None)),
    "v2 proxy unix stream": (v2(0x21, 0x31, b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")),
                             ProxyHeader(2, None, None)),
    "v2 with tlvs": (
        v2(0x21, 0x11, inet() + tlv(0x01, b"smtp") + tlv(0x02, b"mx.example") + tlv(0x04, b"")
           + tlv(0x05, b"x" * 128) + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))),
        ProxyHeader(2, ("192.0.2.1", 56324), ("198.51.100.2", 25))),
    "v2 tcp6 with tlvs": (v2(0x21, 0x21, inet6() + tlv(0xE0, b"custom")),
                          ProxyHeader(2, ("2001:db8::1", 40000), ("2001:db8::25", 587))),
    "v2 with a good crc32c": (with_crc(0x21, 0x11, inet()), ProxyHeader(2, ("192.0.2.1", 56324),
                                                                       ("198.51.100.2", 25))),
    "v2 local with a bad crc32c: the block is discarded": (with_crc(0x20, 0x00, b"", corrupt=True),
                                                           ProxyHeader(2, None, None)),
    "v2 longest allowed": (v2(0x21, 0x11, inet() + tlv(0x04, bytes(proxy.V2_MAX_LENGTH - 12 - 3))),
                           ProxyHeader(2, ("192.0.2.1", 56324), ("198.51.100.2", 25))),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_header_and_the_rest_is_left_for_smtp(name):
    header, expected = VALID[name]
    assert parse(header) == (expected, len(header))
    # What follows the header belongs to the session, untouched.
    found, consumed = parse(header + SMTP)
    assert found == expected
    assert (header + SMTP)[consumed:] == SMTP


@pytest.mark.parametrize("name", list(VALID))
def test_header_split_across_many_small_reads(name):
    header, expected = VALID[name]
    received = b""
    for octet in header[:-1]:
        received += bytes([octet])
        assert parse(received) is None, f"complete after {len(received)} octets?"
    assert parse(received + header[-1:] + b"MAIL") == (expected, len(header))


def test_pieces_of_random_sizes_then_smtp_in_the_same_read():
    rng = random.Random(7)
    for header, expected in VALID.values():
        stream, buffer, result = header + SMTP, b"", None
        while result is None:
            step = rng.randint(1, 9)
            buffer, stream = buffer + stream[:step], stream[step:]
            result = parse(buffer)
        assert result[0] == expected
        assert buffer[result[1]:] + stream == SMTP


def test_any_bytes_like_input():
    assert parse(bytearray(V1_TCP4 + SMTP)) == parse(V1_TCP4)
    assert parse(memoryview(V2_TCP4 + SMTP)) == parse(V2_TCP4)
    assert parse(b"") is None


INVALID_V1 = {
    "lower case": b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
    "no space after PROXY": b"PROXY\r\n",
    "two spaces": b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
    "two spaces between fields": b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",
    "tab between fields": b"PROXY TCP4\t192.0.2.1 198.51.100.2 1 2\r\n",
    "trailing space": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",
    "empty protocol": b"PROXY \r\n",
    "unknown protocol": b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
    "protocol in lower case": b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n",
    "UNKNOWN with a suffix": b"PROXY UNKNOWNX\r\n",
    "UDP4": b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
    "too few fields": b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
    "too many fields": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
    "ipv4 leading zero": b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",
    "ipv4 three parts": b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n",
    "ipv4 out of range": b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
    "ipv4 as a name": b"PROXY TCP4 localhost 198.51.100.2 1 2\r\n",
    "ipv6 address for TCP4": b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
    "ipv4 address for TCP6": b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
    "ipv6 with a zone": b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",
    "ipv6 two double colons": b"PROXY TCP6 2001::db8::1 2001:db8::2 1 2\r\n",
    "ipv6 in brackets": b"PROXY TCP6 [2001:db8::1] 2001:db8::2 1 2\r\n",
    "port leading zero": b"PROXY TCP4 192.0.2.1 198.51.100.2 025 2\r\n",
    "port 00": b"PROXY TCP4 192.0.2.1 198.51.100.2 00 2\r\n",
    "port too big": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 65536\r\n",
    "port far too big": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 999999\r\n",
    "port with sign": b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
    "negative port": b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
    "port in hex": b"PROXY TCP4 192.0.2.1 198.51.100.2 0x19 2\r\n",
    "empty port": b"PROXY TCP4 192.0.2.1 198.51.100.2  2\r\n",
    "bare LF": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
    "bare CR then text": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX",
    "CR in the middle": b"PROXY TCP4\r 192.0.2.1 198.51.100.2 1 2\r\n",
    "NUL": b"PROXY TCP4 192.0.2.1\x00 198.51.100.2 1 2\r\n",
    "non-ascii": "PROXY TCP4 192.0.2.1 198.51.100.2 1 2é\r\n".encode(),
    "no CRLF in 107 octets": V1_UNKNOWN_LONGEST[:-2] + b"ff\r\n",
    "no CRLF at all, long": b"PROXY " + b"A" * 200,
}


@pytest.mark.parametrize("name", list(INVALID_V1))
def test_invalid_v1(name):
    with pytest.raises(ProxyError) as caught:
        parse(INVALID_V1[name])
    reason = str(caught.value)
    assert reason and "\n" not in reason and len(reason) < 80


def test_v1_line_limit_is_107_octets_including_crlf():
    assert len(V1_UNKNOWN_LONGEST) == 107
    assert parse(V1_UNKNOWN_LONGEST + SMTP)[1] == 107
    # 106 octets without CRLF may still end at 107; one more cannot.
    assert parse(V1_UNKNOWN_LONGEST[:-1]) is None
    with pytest.raises(ProxyError, match="107"):
        parse(V1_UNKNOWN_LONGEST[:-2] + b"f\r")
    with pytest.raises(ProxyError, match="107"):
        parse(b"PROXY UNKNOWN " + b"a" * 93)


def test_v1_partial_line_ending_in_cr_waits_for_lf():
    assert parse(V1_TCP4[:-1]) is None
    with pytest.raises(ProxyError):
        parse(V1_TCP4[:-1] + b"\r")


@pytest.mark.parametrize("name", list(INVALID_V1))
def test_invalid_v1_found_by_the_time_the_line_would_end(name):
    # Fed one octet at a time, a bad line is refused at the latest when its CRLF (or the
    # 107th octet) arrives: never "need more" for ever.
    data = INVALID_V1[name]
    for size in range(1, len(data) + 1):
        try:
            if parse(data[:size]) is not None:
                pytest.fail(f"accepted {data[:size]!r}")
        except ProxyError:
            return
    pytest.fail("never refused")


INVALID_V2 = {
    "version 1 nibble": v2(0x11, 0x11, inet()),
    "version 3 nibble": v2(0x31, 0x11, inet()),
    "version 0 nibble": v2(0x01, 0x11, inet()),
    "unknown command 2": v2(0x22, 0x11, inet()),
    "unknown command F": v2(0x2F, 0x11, inet()),
    "unknown family 4": v2(0x21, 0x41, inet()),
    "unknown transport 3": v2(0x21, 0x13, inet()),
    "udp over ipv4": v2(0x21, 0x12, inet()),
    "udp over ipv6": v2(0x21, 0x22, inet6()),
    "unix datagram": v2(0x21, 0x32, bytes(216)),
    "inet too short": v2(0x21, 0x11, inet()[:8]),
    "inet length 0": v2(0x21, 0x11),
    "inet6 with an inet block": v2(0x21, 0x21, inet()),
    "unix too short": v2(0x21, 0x31, bytes(200)),
    "length over the cap": v2(0x21, 0x11, length=proxy.V2_MAX_LENGTH + 1),
    "length 65535": v2(0x21, 0x11, length=65535),
    "truncated tlv header": v2(0x21, 0x11, inet() + b"\x01\x00"),
    "tlv running past the end": v2(0x21, 0x11, inet() + b"\x01\x00\x09abc"),
    "bad crc32c": with_crc(0x21, 0x11, inet(), corrupt=True),
    "bad crc32c on ipv6": with_crc(0x21, 0x21, inet6(), corrupt=True),
    "bad tlv after a unix block": v2(0x21, 0x31, bytes(216) + b"\x01"),
    "crc32c of the wrong size": v2(0x21, 0x11, inet() + tlv(0x03, b"abc")),
    "signature wrong in its last octet": SIG[:-1] + b"\r" + V2_TCP4[12:],
    "signature wrong in the middle": SIG[:6] + b"X" + SIG[7:] + V2_TCP4[12:],
    "only the first 4 octets": b"\r\n\r\nEHLO x\r\n",
}


@pytest.mark.parametrize("name", list(INVALID_V2))
def test_invalid_v2(name):
    with pytest.raises(ProxyError):
        parse(INVALID_V2[name] + SMTP)


@pytest.mark.parametrize(("data", "needed"), [
    (v2(0x11, 0x11, inet()), 13),  # the version nibble
    (v2(0x2F, 0x11, inet()), 13),  # the command
    (v2(0x21, 0x41, inet()), 14),  # the family
    (v2(0x21, 0x12, inet()), 14),  # a datagram
    (v2(0x21, 0x11, length=proxy.V2_MAX_LENGTH + 1), 16),  # the length, before its body
    (v2(0x21, 0x21, inet()), 16),  # too short for its family, before its body
    (SIG[:5] + b"X", 6),
    (b"\r\nEHLO", 3),
])
def test_invalid_v2_refused_as_soon_as_the_octet_arrives(data, needed):
    for size in range(1, needed):
        assert parse(data[:size]) is None
    with pytest.raises(ProxyError):
        parse(data[:needed])


@pytest.mark.parametrize("data", [
    SMTP, b"EHLO x\r\n", b"HELO x\r\n", b"E", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n",
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"\x00", b" PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\n", b"\n", b"\r\r",
    b"PROXX", b"PROXY\n",
])
def test_not_a_proxy_header_is_refused_at_once(data):
    # A client that speaks first at a PROXY listener is dropped now, not left waiting.
    with pytest.raises(ProxyError):
        parse(data)


@pytest.mark.parametrize("prefix", [b"P", b"PRO", b"PROXY", b"PROXY ", b"PROXY TCP4 1", b"\r", b"\r\n\r\n\x00",
                                    SIG, SIG + b"\x21", SIG + b"\x21\x11", SIG + b"\x21\x11\x00"])
def test_prefix_of_a_header_needs_more(prefix):
    assert parse(prefix) is None


def test_garbage_never_waits_past_max_header():
    # Whatever a client sends, MAX_HEADER octets are enough to decide.
    rng = random.Random(42)
    starts = [b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", b"\r", SIG, SIG + b"\x21", SIG + b"\x21\x11"]
    for _ in range(3000):
        data = rng.choice(starts) + rng.randbytes(MAX_HEADER)
        data = data[:MAX_HEADER]
        try:
            result = parse(data)
        except ProxyError:
            continue
        assert result is not None
        assert result[1] <= MAX_HEADER


def test_max_header_covers_both_versions():
    assert MAX_HEADER >= 107
    assert MAX_HEADER >= 16 + 216 + 3 + 128  # a UNIX block and a 128-octet unique ID
    assert MAX_HEADER == 16 + proxy.V2_MAX_LENGTH


def test_crc32c_check_value():
    # The standard check value of CRC-32C (RFC 3720 B.4 and every CRC catalogue).
    assert proxy.crc32c(b"123456789") == 0xE3069283
    assert proxy.crc32c(b"") == 0


def test_proxy_error_is_a_value_error():
    assert issubclass(ProxyError, ValueError)
