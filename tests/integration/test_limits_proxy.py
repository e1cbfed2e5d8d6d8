"""PROXY protocol, connection caps, flood protection and the [limits] of mail, end to end.

The real daemon (bin/elemta) on loopback; the clients pick their source address among
127.0.0.0/8 (any of them works on Linux), so one test machine plays a proxy, its clients and
several independent senders.  The queue is read back from SQLite as an admin would.
"""

from __future__ import annotations

import re
import smtplib
import socket
import struct
from collections import Counter

import pytest

from tests.support import Daemon, RawClient, wait_for

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


# ---- clients -----------------------------------------------------------------------------------


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


class Client(RawClient):
    """RawClient from a chosen source address, optionally sending bytes (a PROXY header) first."""

    def __init__(self, port: int, source: str = "127.0.0.1", first: bytes = b"", read_greeting: bool = True):
        self.sock = connect(port, source)
        self._buf = b""
        if first:
            self.sock.sendall(first)
        self.greeting = self.reply() if read_greeting else None

    def rest(self) -> bytes:
        """Everything the server still sends until it closes (what was buffered included)."""
        data, self._buf = self._buf, b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data


def first_line(sock: socket.socket) -> bytes:
    """What the server sent up to and including its first CRLF (b"" if it closed first)."""
    data = b""
    while b"\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def queued_id(reply: tuple[int, str]) -> str:
    code, text = reply
    assert code == 250, reply
    match = re.fullmatch(r"2\.0\.0 Ok: queued as (\w+)", text)
    assert match, text
    return match.group(1)


def send_message(c: RawClient, sender: str, recipients: list[str], subject: str = "test") -> str:
    """One whole transaction on an open session; returns the queue ID."""
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    for rcpt in recipients:
        assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    return queued_id(c.cmd(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n"))


def message_row(daemon: Daemon, queue_id: str):
    with daemon.db() as db:
        row = db.execute("SELECT * FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    assert row is not None, f"{queue_id} is not in the queue"
    return row


def received(daemon: Daemon, queue_id: str) -> str:
    """The Received field elemta prepended, unfolded."""
    body = daemon.body(queue_id)
    assert body.startswith(b"Received: ")
    end = body.index(b";\r\n\t") + 3
    end = body.index(b"\r\n", end)
    return body[:end].decode().replace("\r\n\t", " ")


def log_has(daemon: Daemon, pattern: str, what: str) -> None:
    """Wait for a log line matching the regular expression (lines reach the log in batches)."""
    regex = re.compile(pattern, re.MULTILINE)
    wait_for(lambda: regex.search(daemon.log_text()), 10, what=what)


# ---- PROXY protocol headers ----------------------------------------------------------------------


def v1(src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 25) -> bytes:
    protocol = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v2 PROXY command over TCP, IPv4 or IPv6 by the addresses' form (§2.2)."""
    if ":" in src:
        family, addresses = 0x21, socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    else:
        family, addresses = 0x11, socket.inet_aton(src) + socket.inet_aton(dst)
    block = addresses + struct.pack("!HH", sport, dport)
    assert len(block) == (12 if family == 0x11 else 36)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block


V2_LOCAL = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)


PROXY_CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"
proxy_protocol = true

[server]
spool_dir = "@SPOOL@"
hostname = "proxy.test"
max_connections_per_ip = 2
proxy_networks = ["127.0.0.1/32"]

[smtp]
local_domains = ["example.com"]
trusted_networks = []

[limits]
ip_connections_per_minute = 10

[queue]
min_free_space = 0

[delivery]
hold = true
"""


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("proxy"), PROXY_CONFIG).start()
    yield daemon
    assert daemon.stop() == 0


def sessions_ended(daemon: Daemon) -> None:
    """Wait until every session the daemon started has ended (its connection released)."""
    wait_for(
        lambda: (log := daemon.log_text()).count(" connect ip=") == log.count(" disconnect ip="),
        10, what="the open sessions to end",
    )


@pytest.mark.parametrize(
    ("src", "dst", "literal"),
    [("192.0.2.7", "127.0.0.1", "[192.0.2.7]"), ("2001:db8::9", "2001:db8::25", "[IPv6:2001:db8::9]")],
    ids=["tcp4", "tcp6"],
)
def test_v1_header_names_the_client(proxied, src, dst, literal):
    with Client(proxied.port, first=v1(src, dst)) as c:
        assert c.greeting[0] == 220
        assert c.cmd("EHLO client.example")[0] == 250
        qid = send_message(c, "a@example.org", ["user@example.com"], "v1")
        assert c.cmd("QUIT")[0] == 221
    assert message_row(proxied, qid)["client_ip"] == src
    assert received(proxied, qid).startswith(f"Received: from client.example ({literal}) by proxy.test")
    log_has(proxied, rf"NOQUEUE connect ip={re.escape(src)} port=40000 .*proxy=127\.0\.0\.1$", "the connect line")


@pytest.mark.parametrize(
    ("src", "literal"), [("198.51.100.8", "[198.51.100.8]"), ("2001:db8::7", "[IPv6:2001:db8::7]")],
    ids=["tcp4", "tcp6"],
)
def test_v2_header_names_the_client(proxied, src, literal):
    dst = "2001:db8::25" if ":" in src else "192.0.2.25"
    # The header and the first command in one write: what comes behind the header is SMTP.
    with Client(proxied.port, first=v2(src, dst, 41000, 25) + b"EHLO client.example\r\n") as c:
        assert c.greeting[0] == 220
        assert c.reply()[0] == 250  # the EHLO that came with the header
        qid = send_message(c, "b@example.org", ["user@example.com"], "v2")
        assert c.cmd("QUIT")[0] == 221
    assert message_row(proxied, qid)["client_ip"] == src
    assert received(proxied, qid).startswith(f"Received: from client.example ({literal}) by proxy.test")
    log_has(proxied, rf"NOQUEUE connect ip={re.escape(src)} port=41000 .*proxy=127\.0\.0\.1$", "the connect line")


@pytest.mark.parametrize("header", [V2_LOCAL, b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
def test_a_health_check_is_the_proxy_itself(proxied, header):
    sessions_ended(proxied)  # the proxy's own address has a cap of 2 too
    with Client(proxied.port, first=header) as c:
        assert c.greeting[0] == 220
        assert c.cmd("EHLO health.example")[0] == 250
        qid = send_message(c, "health@example.org", ["user@example.com"], "local")
        assert c.cmd("QUIT")[0] == 221
    assert message_row(proxied, qid)["client_ip"] == "127.0.0.1"
    assert "([127.0.0.1])" in received(proxied, qid)
    log_has(proxied, r"NOQUEUE connect ip=127\.0\.0\.1 .*proxy=127\.0\.0\.1$", "the connect line")


def test_a_source_outside_proxy_networks_gets_no_greeting(proxied):
    with Client(proxied.port, source="127.0.0.9", read_greeting=False) as c:
        assert c.rest() == b""
    log_has(proxied, r"NOQUEUE reject ip=127\.0\.0\.9 .*reason=proxy_not_trusted", "the reject line")


def test_even_a_valid_header_from_outside_proxy_networks_is_refused(proxied):
    with Client(proxied.port, source="127.0.0.10", first=v1("192.0.2.99"), read_greeting=False) as c:
        assert until_closed(c.sock) == b""
    log_has(proxied, r"NOQUEUE reject ip=127\.0\.0\.10 .*reason=proxy_not_trusted", "the reject line")
    assert "ip=192.0.2.99" not in proxied.log_text()


@pytest.mark.parametrize(
    "first",
    [
        b"EHLO x\r\n",
        b"PROXY TCP4 192.0.2.300 127.0.0.1 40000 25\r\n",  # no such address
        b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\n",  # bare LF
        b"PROXY SCTP 192.0.2.7 127.0.0.1 40000 25\r\n",
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # shorter than IPv4 addresses
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
    ids=["smtp", "bad-address", "bare-lf", "protocol", "v2-version", "v2-short", "tls"],
)
def test_a_connection_without_a_valid_header_is_closed(proxied, first):
    before = proxied.log_text().count("reason=proxy_header")
    with Client(proxied.port, first=first, read_greeting=False) as c:
        assert until_closed(c.sock) == b"", "closed without a greeting"
    wait_for(lambda: proxied.log_text().count("reason=proxy_header") > before, 10, what="the reject line")
    last = [line for line in proxied.log_text().splitlines() if "reason=proxy_header" in line][-1]
    assert re.search(r"NOQUEUE reject ip=127\.0\.0\.1 conn=\d+ reason=proxy_header error=\S", last), last


def test_the_per_ip_cap_counts_the_client_not_the_proxy(proxied):
    refused = b"421 4.7.0 proxy.test Too many connections from your address\r\n"
    open_ = []
    try:
        for _ in range(2):
            open_.append(Client(proxied.port, first=v1("203.0.113.50")))
            assert open_[-1].greeting[0] == 220
        with Client(proxied.port, first=v1("203.0.113.50"), read_greeting=False) as third:
            assert third.rest() == refused
        log_has(proxied, r"NOQUEUE reject ip=203\.0\.113\.50 .*reason=connection_limit proxy=127\.0\.0\.1",
                "the reject line")
        # Three more clients through the same proxy, the first two still connected: the proxy
        # holds five connections, over a cap of 2 were it counted under its own address.
        for client in ("203.0.113.51", "203.0.113.52", "203.0.113.53"):
            open_.append(Client(proxied.port, first=v1(client)))
            assert open_[-1].greeting[0] == 220
        for c in open_:
            assert c.cmd("EHLO c.example")[0] == 250
    finally:
        for c in open_:
            c.close()


def connect_via_proxy(daemon: Daemon, client: str) -> bytes:
    """One proxied connection for client, ended at once: the server's first line."""
    with Client(daemon.port, first=v1(client), read_greeting=False) as c:
        line = first_line(c.sock)
        if line.startswith(b"220 "):
            assert c.cmd("QUIT")[0] == 221
    sessions_ended(daemon)  # released before the next one, whatever the cap
    return line


def until_rate_refused(daemon: Daemon, client: str) -> list[bytes]:
    """Proxied connections for client until one is refused (the bucket drains 1 per 6 s, so
    a slow machine may need an 11th or 12th): the server's first lines."""
    lines: list[bytes] = []
    while len(lines) < 20 and (not lines or lines[-1].startswith(b"220 ")):
        lines.append(connect_via_proxy(daemon, client))
    return lines


def test_the_connection_rate_counts_the_client_not_the_proxy(proxied):
    lines = until_rate_refused(proxied, "203.0.113.60")
    assert len(lines) > 10 and all(line.startswith(b"220 ") for line in lines[:-1]), lines
    assert lines[-1] == b"421 4.7.0 proxy.test Too many connections from your address per minute\r\n"
    # The same proxy speaks for another client: that one has a rate of its own.
    assert connect_via_proxy(proxied, "203.0.113.61").startswith(b"220 ")


def test_a_proxied_rate_refusal_is_logged_as_a_rate_refusal(proxied):
    assert until_rate_refused(proxied, "203.0.113.70")[-1].endswith(b"per minute\r\n")
    line = wait_for(lambda: re.search(r"NOQUEUE reject ip=203\.0\.113\.70 .*", proxied.log_text()), 10,
                    what="the reject line").group(0)
    assert "reason=connection_rate" in line, line


def test_two_health_checks_at_once_are_within_a_cap_of_two(proxied):
    sessions_ended(proxied)
    with Client(proxied.port, first=V2_LOCAL) as first:
        assert first.greeting[0] == 220
        with Client(proxied.port, first=V2_LOCAL, read_greeting=False) as second:
            assert first_line(second.sock).startswith(b"220 ")


# ---- a flood from one address --------------------------------------------------------------------

FLOOD_CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "flood.test"
max_connections_per_ip = 20

[smtp]
local_domains = ["example.com"]
trusted_networks = []

[limits]
ip_connections_per_minute = 100

[queue]
min_free_space = 0

[delivery]
hold = true
"""

CAP = b"421 4.7.0 flood.test Too many connections from your address\r\n"
RATE = b"421 4.7.0 flood.test Too many connections from your address per minute\r\n"


def mail_from_other_client(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=("127.0.0.3", 0)) as smtp:
        assert smtp.ehlo("other.example")[0] == 250
        assert smtp.mail("other@example.org")[0] == 250
        assert smtp.rcpt("user@example.com")[0] == 250
        code, text = smtp.data(b"Subject: still here\r\n\r\nhello\r\n")
        assert code == 250, text
        return queued_id((code, text.decode()))


def test_a_flood_from_one_address_leaves_room_for_others(tmp_path):
    """500 connections from one client hit the per-IP limit with the right replies while
    another client still gets mail in."""
    daemon = Daemon(tmp_path, FLOOD_CONFIG).start()
    port = daemon.port
    held: list[socket.socket] = []
    refusals: Counter = Counter()
    admitted = closed = 0
    others: list[str] = []
    try:
        for _ in range(500):
            sock = connect(port, "127.0.0.2")
            line = first_line(sock)
            if line.startswith(b"220 "):
                held.append(sock)  # kept open: the open-connection cap is reached
                admitted += 1
                continue
            reply = line + until_closed(sock)  # the refusal is the only line, then EOF
            sock.close()
            assert reply in (CAP, RATE), reply
            refusals[reply] += 1
            if refusals[reply] in (1, 2, 100):  # while the flood holds its connections
                others.append(mail_from_other_client(port))
            if reply == CAP:
                # Let some go, and wait for the server to have seen them go, so that new
                # connections are admitted until the rate per minute refuses them.
                for gone in held[:10]:
                    gone.close()
                closed += len(held[:10])
                del held[:10]
                wait_for(lambda n=closed: daemon.log_text().count(" disconnect ip=127.0.0.2 ") >= n, 10,
                         what="the server to release the closed connections")
        assert admitted + sum(refusals.values()) == 500
        assert refusals[CAP] >= 1 and refusals[RATE] >= 1, refusals
        # The rate is a token bucket of 100 per minute: it refuses only after 100 admissions.
        assert admitted >= 100
        others.append(mail_from_other_client(port))
        for sock in held:
            sock.close()
        held.clear()
        others.append(mail_from_other_client(port))
        for qid in others:
            assert message_row(daemon, qid)["client_ip"] == "127.0.0.3"
        log_has(daemon, r"NOQUEUE reject ip=127\.0\.0\.2 reason=connection_limit", "a cap reject line")
        log_has(daemon, r"NOQUEUE reject ip=127\.0\.0\.2 reason=connection_rate", "a rate reject line")
        assert not re.search(r"reject ip=127\.0\.0\.3 ", daemon.log_text())
    except BaseException:
        print(daemon.log_text()[-5000:])
        raise
    finally:
        for sock in held:
            sock.close()
        assert daemon.stop() == 0


# ---- limits on mail --------------------------------------------------------------------------------

MAIL_CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "limits.test"

[smtp]
local_domains = ["example.com"]
trusted_networks = ["127.0.0.4/32"]

[limits]
ip_messages_per_hour = 2
ip_recipients_per_hour = 3
sender_messages_per_hour = 1

[queue]
min_free_space = 0

[delivery]
hold = true
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """One daemon for the mail limits: each test uses its own client addresses and senders."""
    daemon = Daemon(tmp_path_factory.mktemp("limits"), MAIL_CONFIG).start()
    yield daemon
    assert daemon.stop() == 0


def held_recipients(daemon: Daemon, qid: str) -> list[tuple[str, str]]:
    return [(r["address"], r["state"]) for r in daemon.recipients(qid)]


def test_messages_per_hour_from_one_address(limited):
    with Client(limited.port, source="127.0.0.5") as c:
        assert c.cmd("EHLO c.example")[0] == 250
        # Different senders: only the address's own limit is in play.
        first = send_message(c, "m1@example.org", ["user@example.com"])
        second = send_message(c, "m2@example.org", ["user@example.com"])
        assert c.cmd("MAIL FROM:<m3@example.org>") == (
            450, "4.7.1 Rate limit reached: messages per hour from your address, try again later",
        )
        # A 4xx: the session goes on, and so does the refusal.
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("MAIL FROM:<m4@example.org>")[0] == 450
        assert c.cmd("QUIT")[0] == 221
    # Nothing accepted is lost.
    for qid, sender in ((first, "m1@example.org"), (second, "m2@example.org")):
        row = message_row(limited, qid)
        assert (row["sender"], row["client_ip"]) == (sender, "127.0.0.5")
        assert held_recipients(limited, qid) == [("user@example.com", "held")]
        assert b"hello" in limited.body(qid)
    # Another address is not affected.
    with Client(limited.port, source="127.0.0.11") as c:
        assert c.cmd("EHLO c.example")[0] == 250
        send_message(c, "m5@example.org", ["user@example.com"])


def test_recipients_per_hour_from_one_address(limited):
    with Client(limited.port, source="127.0.0.6") as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("MAIL FROM:<r@example.org>")[0] == 250
        for n in range(3):
            assert c.cmd(f"RCPT TO:<u{n}@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<u3@example.com>") == (
            452, "4.7.1 Rate limit reached: recipients per hour from your address, try again later",
        )
        # The transaction goes on with the recipients already accepted.
        assert c.cmd("DATA")[0] == 354
        qid = queued_id(c.cmd("Subject: three\r\n\r\nhello\r\n.\r\n"))
    assert held_recipients(limited, qid) == [(f"u{n}@example.com", "held") for n in range(3)]


def test_messages_per_hour_from_one_sender(limited):
    with Client(limited.port, source="127.0.0.7") as c:
        assert c.cmd("EHLO c.example")[0] == 250
        qid = send_message(c, "sender@example.org", ["user@example.com"])
    with Client(limited.port, source="127.0.0.8") as c:
        assert c.cmd("EHLO c.example")[0] == 250
        code, text = c.cmd("MAIL FROM:<Sender@Example.ORG>")
        assert (code, text.split(" ")[0]) == (450, "4.7.1")
        assert "messages per hour from this sender" in text
        # The refused MAIL cost this address nothing: another sender still gets through.
        send_message(c, "other-sender@example.org", ["user@example.com"])
    assert message_row(limited, qid)["sender"] == "sender@example.org"


def test_a_trusted_client_is_exempt(limited):
    ids = []
    for n in range(5):
        with smtplib.SMTP("127.0.0.1", limited.port, timeout=10, source_address=("127.0.0.4", 0)) as smtp:
            assert smtp.ehlo("trusted.example")[0] == 250
            assert smtp.mail("trusted@example.org")[0] == 250
            for r in range(4):
                assert smtp.rcpt(f"t{r}@example.com")[0] == 250
            code, text = smtp.data(f"Subject: trusted {n}\r\n\r\nhello\r\n".encode())
            ids.append(queued_id((code, text.decode())))
    for qid in ids:
        assert message_row(limited, qid)["client_ip"] == "127.0.0.4"
        assert len(limited.recipients(qid)) == 4
