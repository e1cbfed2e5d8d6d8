"""smtp/server.py in process: a real listener on 127.0.0.1:0, a real queue, real sockets."""

from __future__ import annotations

import dataclasses
import select
import socket
import time

import pytest

from elemta import config as cfg
from tests.smtp.servers import Servers
from tests.support import RawClient, wait_for


@pytest.fixture
def running(tmp_path):
    servers = Servers(tmp_path)
    server, lines, _config = servers.start()
    port = next(iter(server.listeners.values())).port
    yield server, lines, port
    servers.close(grace=5)


def test_a_bug_in_a_session_is_a_451_and_the_server_goes_on(running):
    server, lines, port = running

    def broken_new_id() -> str:
        raise RuntimeError("simulated bug")

    good = server.services
    server.services = dataclasses.replace(good, new_id=broken_new_id)  # fault injection
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        code, text = c.cmd("MAIL FROM:<a@example.org>")
        assert (code, text.split()[0]) == (451, "4.3.0")
        assert "simulated" not in text  # no exception text reaches the client
        assert c.closed_by_server()
    log = "".join(lines)
    assert " NOQUEUE internal_error ip=127.0.0.1 conn=1\n" in log
    assert "RuntimeError: simulated bug" in log
    server.services = good
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250


def test_connection_numbers_and_counts_are_released(running):
    server, _store, port = running
    for _ in range(3):
        with RawClient("127.0.0.1", port) as c:
            assert c.cmd("QUIT")[0] == 221
    assert server.connections.wait_idle(5)
    assert server.connections.count() == 0


def test_a_reload_keeps_the_rate_counters_and_the_password_file(running):
    server, _lines, _port = running
    limiter, verifier = server.limiter, server.services.verifier
    server.reload(server.config)  # SIGHUP with the same [limits]: a lockout must stay
    assert server.limiter is limiter and server.services.verifier is verifier
    changed = cfg.replace(server.config, limits={"ip_messages_per_hour": 7})
    server.reload(changed)
    assert server.limiter is not limiter
    assert server.limiter.ip_messages.limit == 7


# ---- whole deadlines, stress mode, reserved slots (issue 16, defect 1) -------------------------


@pytest.fixture
def serve(tmp_path):
    """serve(server={...}, smtp={...}) -> (server, log lines, {role: (host, port)}); mx and submission
    listeners; only 127.0.0.2 is trusted, so 127.0.0.1 plays the stranger."""
    servers = Servers(tmp_path)

    def start(server=None, smtp=None):
        srv, lines, _config = servers.start(
            [{"address": "127.0.0.1:0", "role": "mx"}, {"address": "127.0.0.3:0", "role": "submission"}],
            server=server, smtp={"trusted_networks": ["127.0.0.2/32"], **(smtp or {})})
        ports = {s.listener.role: s.server_address[:2] for s in srv.listeners.values()}
        return srv, lines, ports

    yield start
    servers.close(grace=1)


class From(RawClient):
    """RawClient from a chosen loopback source address."""

    def __init__(self, address: tuple, source: str = "127.0.0.1", read_greeting: bool = True):
        self.sock = socket.create_connection(address, timeout=20, source_address=(source, 0))
        self._buf = b""
        self.greeting = self.reply() if read_greeting else None

    def dribble(self, data: bytes, every: float) -> int:
        """Send data a byte at a time, `every` seconds apart, until the server answers;
        return how many bytes went out before that (len(data) if it never did)."""
        for sent, byte in enumerate(data):
            if select.select([self.sock], [], [], every)[0]:
                return sent
            self.sock.sendall(bytes([byte]))
        return len(data)


def test_a_command_sent_a_byte_at_a_time_ends_at_its_whole_deadline(serve):
    # Each byte comes well within any per-read timeout; before whole deadlines this client
    # held its session thread for as long as it liked.
    _, lines, ports = serve(smtp={"command_timeout": 2})
    with From(ports["mx"]) as c:
        sent = c.dribble(b"EHLO " + b"x" * 60, every=0.25)  # 15 s of dribbling, no CRLF
        assert sent < 60
        code, text = c.reply()
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert c.closed_by_server()
    wait_for(lambda: any(" timeout " in ln and "limit=deadline" in ln for ln in lines), 5, what="the log line")
    assert any("phase=command" in ln for ln in lines if " timeout " in ln)


def test_message_text_slower_than_the_minimum_rate_ends_and_faster_text_is_taken(serve):
    _, lines, ports = serve(smtp={"data_timeout": 2, "min_data_rate": 20})
    with From(ports["mx"]) as c:
        for command in ("EHLO c.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.com>"):
            assert c.cmd(command)[0] == 250
        assert c.cmd("DATA")[0] == 354
        # 4 octets/s against 20: the allowance is 2 s + n/20 s, so it ends after about 2.5 s.
        sent = c.dribble(b"Subject: slow\r\n\r\n" + b"y" * 100, every=0.25)
        assert sent < 117
        assert c.reply()[:1] == (421,)
    assert any(" timeout " in ln and "phase=data" in ln and "limit=deadline" in ln for ln in lines)
    with From(ports["mx"]) as c:
        for command in ("EHLO c.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.com>"):
            assert c.cmd(command)[0] == 250
        assert c.cmd("DATA")[0] == 354
        # Past data_timeout in all, but at some 200 octets/s: each one earns its time.
        c.send(b"Subject: steady\r\n\r\n")
        for _ in range(16):
            assert not select.select([c.sock], [], [], 0.25)[0]
            c.send(b"z" * 48 + b"\r\n")
        assert c.cmd(b".\r\n")[0] == 250


def test_under_stress_idle_strangers_are_closed_and_trusted_clients_stay(serve):
    server, lines, ports = serve(server={"max_connections": 8, "reserved_connections": 2},
                                 smtp={"stress_timeout": 1})
    strangers = [From(ports["mx"]) for _ in range(5)]
    # The scenario: strangers idle longer than stress_timeout when stress begins.  So all of
    # them are past it at the first sweep under stress; were some not, the first ones closed
    # would end the stress (5 of 8 open) and the rest would rightly keep the 300 s rule (this
    # test failed so once under a loaded CI, the strangers' greetings spread over a sweep).
    time.sleep(1.5)  # idleness the scenario needs, not a wait for something to happen
    trusted = From(ports["mx"], source="127.0.0.2")
    try:
        assert trusted.cmd("EHLO admin.example")[0] == 250  # 6 of 8 open: stress
        for c in strangers:
            code, text = c.reply()  # idle beyond stress_timeout: closed, though 300 s is the rule
            assert (code, text.split()[0]) == (421, "4.4.2")
        wait_for(lambda: server.connections.count() == 1, 10, what="the strangers' sessions to end")
        assert trusted.cmd("NOOP")[0] == 250
    finally:
        for c in [*strangers, trusted]:
            c.close()
    wait_for(lambda: any(" stress state=off" in ln for ln in lines), 10, what="stress to end")
    assert any(" stress state=on connections=6 max_connections=8" in ln for ln in lines)
    assert any("limit=stress" in ln for ln in lines)


def test_the_reserved_slots_admit_trusted_and_submission_clients_when_port_25_is_full(serve):
    _, lines, ports = serve(server={"max_connections": 6, "reserved_connections": 2},
                                 smtp={"stress_timeout": 0})
    clients = [From(ports["mx"]) for _ in range(4)]
    try:
        with From(ports["mx"], read_greeting=False) as refused:
            code, text = refused.reply()
            assert (code, text.split()[0]) == (421, "4.7.0") and "Too many connections" in text
        clients.append(From(ports["submission"]))  # the user's own submission port
        clients.append(From(ports["mx"], source="127.0.0.2"))  # the trusted network
        for c in clients[-2:]:
            assert c.greeting[0] == 220 and c.cmd("EHLO c.example")[0] == 250
        with From(ports["submission"], read_greeting=False) as over:
            assert over.reply()[0] == 421  # max_connections still holds for everyone
    finally:
        for c in clients:
            c.close()
    assert any("reason=connection_limit" in ln for ln in lines)
