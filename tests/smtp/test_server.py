"""smtp/server.py in process: a real listener on 127.0.0.1:0, a real queue, real sockets."""

from __future__ import annotations

import dataclasses

import pytest

from elemta import config as cfg
from elemta.log import EventLog
from elemta.queue.store import Store
from elemta.smtp.server import SmtpServer
from tests.support import RawClient


@pytest.fixture
def running(tmp_path):
    config = cfg.parse({
        "listeners": [{"address": "127.0.0.1:0", "role": "mx"}],
        "server": {"spool_dir": str(tmp_path), "hostname": "mx.test.example"},
        "smtp": {"local_domains": ["example.com"]},
        "queue": {"min_free_space": 0},
    })
    store = Store(config.queue_path)
    store.open()
    lines: list[str] = []
    server = SmtpServer(config, store, EventLog(sink=lines.append))
    server.start()
    port = next(iter(server.listeners.values())).port
    yield server, lines, port
    server.stop(grace=5)
    store.close()


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
