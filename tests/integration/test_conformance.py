"""The protocol cases of shared/conformance-cases.md, each through a real socket against the
real daemon (bin/elemta as a subprocess).  Case numbers refer to that list.

A check that "nothing else came back" sends a NOOP afterwards and expects its 250 as the very
next reply: a stray reply (say a 500 for a smuggled command) would arrive first.
"""

from __future__ import annotations

import pytest

from tests.support import Daemon, RawClient, wait_for

MAIN_CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[[listeners]]
address = "[::1]:0"
role = "submission"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"

[smtp]
max_message_size = 10000
max_received_headers = 5
local_domains = ["example.com"]
relay_domains = ["example.net"]
trusted_networks = []

[queue]
min_free_space = 0

# These tests are about intake: keep the mail in the queue.
[delivery]
hold = true
"""

STRICT_CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "strict.test.example"
max_connections_per_ip = 2

[smtp]
greet_pause = 0.5
max_errors = 3
command_timeout = 1
local_domains = ["example.com"]

[queue]
min_free_space = 0

# These tests are about intake: keep the mail in the queue.
[delivery]
hold = true
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("conformance"), MAIN_CONFIG).start()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("strict"), STRICT_CONFIG).start()
    yield daemon
    assert daemon.stop() == 0


def connect(server) -> RawClient:
    client = RawClient("127.0.0.1", server.ports["mx"])
    assert client.greeting[0] == 220
    return client


def open_transaction(client: RawClient, rcpt: str = "user@example.com") -> None:
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250


def code_esc(reply) -> str:
    code, text = reply
    return f"{code} {text.split(' ', 1)[0]}"


def only_reply_was(client: RawClient) -> None:
    """Nothing more is pending: the NOOP's own 250 is the next reply."""
    assert client.cmd("NOOP") == (250, "2.0.0 Ok")


def queued_id(reply) -> str:
    code, text = reply
    assert code == 250 and "queued as" in text, reply
    return text.rsplit(" ", 1)[1]


def message_count(server) -> int:
    return len(server.messages())


def test_01_dot_unstuffing(server):
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: dots\r\n\r\n.From\r\n..x\r\n..\r\n.This\r\n.\r\n")
        qid = queued_id(c.reply())
    body = server.body(qid)
    assert body.endswith(b"Subject: dots\r\n\r\nFrom\r\n.x\r\n.\r\nThis\r\n")


def test_02_smuggling_makes_no_second_message(server):
    before = message_count(server)
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Testing\n.\r\nNO SMUGGLING\r\n.\r\n")
        assert code_esc(c.reply()) == "550 5.6.0"
        only_reply_was(c)
    assert message_count(server) == before


@pytest.mark.parametrize("fake", [b".\n", b"xxx\n.\n"])
def test_03_bare_lf_dot_does_not_end_data(server, fake):
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: x\r\n\r\n" + fake + b"MAIL FROM:<evil@example.org>\r\n.\r\n")
        assert code_esc(c.reply()) == "550 5.6.0"
        only_reply_was(c)


@pytest.mark.parametrize("ending", [
    b"\n.\n", b"\r.\r\n", b"\n\n.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
])
def test_04_false_endings_do_not_end_data(server, ending):
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: x\r\n\r\nbody" + ending + b"NOOP\r\n.\r\n")
        code, text = c.reply()
        # Endings with a bare CR or LF are refused; the NUL ones are plain text.
        assert code in (250, 550), (code, text)
        if code == 250:
            assert b"NOOP" in server.body(queued_id((code, text)))
        only_reply_was(c)


def test_05_oversized_message_read_to_real_end(server):
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send((b"x" * 70 + b"\r\n") * 200)  # 14,400 octets > 10,000
        c.send(b".\nHELP\r\nHELP\r\n.\r\n")
        assert code_esc(c.reply()) == "552 5.3.4"
        only_reply_was(c)


def test_06_overlong_commands_then_session_survives(server):
    with connect(server) as c:
        assert code_esc(c.cmd(b"NOOP " + b"x" * 506 + b"\r\n")) == "500 5.5.2"  # 513 octets
        assert code_esc(c.cmd(b"NOOP " + b"x" * 1_000_000 + b"\r\n")) == "500 5.5.2"
        only_reply_was(c)


def test_07_long_text_lines_refused_after_the_dot(server):
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        # Over 998 octets a line, under max_message_size (10,000) in all: this is about lines.
        c.send(b"Subject: x\r\n\r\n" + b"y" * 1555 + b"\r\n" + b"z" * 1555 + b"\r\n.\r\n")
        assert code_esc(c.reply()) == "500 5.6.0"
        only_reply_was(c)


@pytest.mark.parametrize("command", ["HELO", "EHLO"])
def test_08_hello_needs_an_argument(server, command):
    with connect(server) as c:
        assert code_esc(c.cmd(command)) == "501 5.5.4"


def test_09_order_rules(server):
    with connect(server) as c:
        assert code_esc(c.cmd("DATA")) == "503 5.5.1"  # before HELO
        assert c.cmd("EHLO c.example")[0] == 250
        assert code_esc(c.cmd("DATA")) == "503 5.5.1"  # before MAIL
        assert code_esc(c.cmd("RCPT TO:<user@example.com>")) == "503 5.5.1"  # without MAIL
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert code_esc(c.cmd("MAIL FROM:<a@example.org>")) == "503 5.5.1"  # twice
        assert code_esc(c.cmd("DATA")) == "503 5.5.1"  # no RCPT


def test_10_rset(server):
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("RSET") == (250, "2.0.0 Ok")
        assert code_esc(c.cmd("DATA")) == "503 5.5.1"
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250  # greeting kept
        assert code_esc(c.cmd("RSET FOO")) == "501 5.5.4"


def test_11_null_paths(server):
    with connect(server) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert code_esc(c.cmd("MAIL FROM:<>")) == "250 2.1.0"
        assert code_esc(c.cmd("RCPT TO:<>")) == "501 5.1.3"


def test_12_postmaster_without_domain(server):
    with connect(server) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert code_esc(c.cmd("RCPT TO:<postmaster>")) == "250 2.1.5"
        assert code_esc(c.cmd("RCPT TO:<Postmaster>")) == "250 2.1.5"
        assert code_esc(c.cmd("RCPT TO:<a>")) == "501 5.1.3"


@pytest.mark.parametrize("command, expected", [
    ("MAIL FROM:<u@example.org> FOO", "555 5.5.4"),
    ("MAIL FROM:<u@example.org> SIZE=3005", "250 2.1.0"),
    ("MAIL FROM:<u@example.org> BODY=8BITMIME", "250 2.1.0"),
    ("MAIL FROM:<u@example.org> BODY=9BIT", "501 5.5.4"),
    ("MAIL FROM:<u@example.org> SMTPUTF8=YES", "501 5.5.4"),
])
def test_13_mail_parameters(server, command, expected):
    with connect(server) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert code_esc(c.cmd(command)) == expected


def test_13_size_on_rcpt_is_unknown(server):
    with connect(server) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("MAIL FROM:<u@example.org>")[0] == 250
        assert code_esc(c.cmd("RCPT TO:<user@example.com> SIZE=")) == "555 5.5.4"


def test_14_eight_bit_body_without_8bitmime_stored_unchanged(server):
    body = "Subject: 8bit\r\n\r\nGrüße aus Köln \xff\r\n".encode("latin-1")
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(body + b".\r\n")
        qid = queued_id(c.reply())
    assert server.body(qid).endswith(body)


def test_15_pipelined_replies_in_order(server):
    with connect(server) as c:
        assert "PIPELINING" in c.cmd("EHLO c.example")[1]
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
               b"RCPT TO:<c@nowhere.example>\r\nDATA\r\n")
        assert [code_esc(c.reply()) for _ in range(3)] == ["250 2.1.0", "250 2.1.5", "550 5.7.1"]
        assert c.reply()[0] == 354
        c.send(b"Subject: p\r\n\r\npipelined\r\n.\r\n")
        queued_id(c.reply())


def test_16_body_before_354_is_a_sync_error(server):
    before = message_count(server)
    with connect(server) as c:
        open_transaction(c)
        c.send(b"DATA\r\nSubject: x\r\n\r\nsmuggled\r\n.\r\n")
        assert code_esc(c.reply()) == "554 5.5.0"
        assert c.closed_by_server()
    assert message_count(server) == before


def test_16_commands_before_greeting_are_a_sync_error(strict):
    with RawClient("127.0.0.1", strict.port, read_greeting=False) as c:
        c.send(b"EHLO early.example\r\n")
        assert code_esc(c.reply()) == "554 5.5.0"
        assert c.closed_by_server()


# Cases 17 (STARTTLS injection) and 18 (AUTH) need certificates and users: they are in
# tests/integration/test_tls_auth.py.


@pytest.mark.parametrize("request_line", ["GET / HTTP/1.1", "CONNECT mx.example:25 HTTP/1.0", "POST / HTTP/1.1"])
def test_19_http_first_command(server, request_line):
    with connect(server) as c:
        assert code_esc(c.cmd(request_line)) == "502 5.5.1"
        assert c.closed_by_server()


@pytest.mark.parametrize("command, expected", [
    ("MAIL FROM:<pepe>", "501 5.1.7"),
    ("RCPT TO:<a@xn--->", "501 5.1.3"),
    ("RCPT TO:<" + "a" * 64 + "@" + ("b" * 60 + ".") * 3 + "example.com>", "501 5.1.3"),
])
def test_20_bad_addresses(server, command, expected):
    with connect(server) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        if command.startswith("RCPT"):
            assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert code_esc(c.cmd(command)) == expected


def test_21_no_lmtp_on_smtp_listeners(server):
    """Case 21 applies to an LMTP listener, which elemta does not have: LHLO is not SMTP."""
    with connect(server) as c:
        assert code_esc(c.cmd("LHLO c.example")) == "500 5.5.1"


def test_22_mail_loop(server):
    with connect(server) as c:
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"".join(b"Received: from hop%d\r\n" % i for i in range(6)) + b"\r\nloop\r\n.\r\n")
        assert code_esc(c.reply()) == "554 5.4.6"


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 203.0.113.9 192.0.2.25 4242 25\r\n",  # PROXY protocol v1
    b"\r\n\r\n\x00\r\nQUIT\n",  # the v2 signature
])
def test_23_proxy_header_from_untrusted_address_is_refused(server, header):
    """No listener trusts a proxy, so the header is refused and the claimed address is not
    taken: the Received field names the real client."""
    with connect(server) as c:
        c.send(header)
        code, _ = c.reply()
        assert 500 <= code < 600
        if header.startswith(b"\r\n"):
            while code != 221:  # the v2 signature is several refused lines, then a QUIT
                code, _ = c.reply()
            return
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: proxied?\r\n\r\nx\r\n.\r\n")
        qid = queued_id(c.reply())
    body = server.body(qid)
    assert b"([127.0.0.1])" in body and b"203.0.113.9" not in body


# ---- further rules of the issue, through the socket ------------------------------------------

def test_relay_denied_on_mx(server):
    with connect(server) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert code_esc(c.cmd("RCPT TO:<x@elsewhere.example>")) == "550 5.7.1"
        assert code_esc(c.cmd("RCPT TO:<x@example.net>")) == "250 2.1.5"  # relay domain


def test_submission_over_ipv6_needs_auth_from_untrusted(server):
    with RawClient("::1", server.ports["submission"]) as c:
        assert c.greeting[0] == 220
        assert c.cmd("EHLO c.example")[0] == 250
        assert code_esc(c.cmd("MAIL FROM:<a@example.org>")) == "530 5.7.0"


def test_error_budget_closes(strict):
    with RawClient("127.0.0.1", strict.port) as c:
        assert code_esc(c.cmd("FOO")) == "500 5.5.1"
        assert code_esc(c.cmd("BAR")) == "500 5.5.1"
        assert code_esc(c.cmd("BAZ")) == "500 5.5.1"
        assert code_esc(c.reply()) == "421 4.7.0"
        assert c.closed_by_server()


def test_command_timeout(strict):
    with RawClient("127.0.0.1", strict.port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert code_esc(c.reply()) == "421 4.4.2"  # after command_timeout = 1 s of silence
        assert c.closed_by_server()


def test_per_ip_connection_cap(strict):
    first = RawClient("127.0.0.1", strict.port)
    second = RawClient("127.0.0.1", strict.port)
    try:
        with RawClient("127.0.0.1", strict.port, read_greeting=False) as third:
            assert code_esc(third.reply()) == "421 4.7.0"
            assert third.closed_by_server()
    finally:
        first.close()
        second.close()
    # Once they are gone, a new client is served again.
    wait_for(lambda: "conn=" in strict.log_text() and _served(strict), 10, what="a fresh connection")


def _served(strict) -> bool:
    with RawClient("127.0.0.1", strict.port) as c:
        return c.greeting[0] == 220


def test_bdat_chunks_pipelined(server):
    with connect(server) as c:
        assert "CHUNKING" in c.cmd("EHLO c.example")[1]
        first, last = b"Subject: chunked\r\n\r\n", b"hi\r\n..\r\n"
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
               b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(first), first, len(last), last))
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
        qid = queued_id(c.reply())
    assert server.body(qid).endswith(b"Subject: chunked\r\n\r\nhi\r\n..\r\n")  # BDAT: no unstuffing
