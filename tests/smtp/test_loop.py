"""smtp/loop.py: a plain listener's sessions in one event loop, and what it hands to threads.

Real sockets on 127.0.0.1:0, a real queue; the rest of the server's tests (test_server.py, the
integration tests) run through the same loop, since it serves every plain listener.
"""

from __future__ import annotations

import contextlib
import errno
import smtplib
import socket
import sqlite3
import ssl
import threading

import pytest

from elemta.queue.store import Store
from elemta.smtp import loop as loop_mod
from elemta.smtp.loop import LoopListener
from elemta.smtp.server import ListenerServer
from tests.smtp.servers import Servers
from tests.support import RawClient, wait_for

trustme = pytest.importorskip("trustme")

MESSAGE = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\n" + (b"x" * 70 + b"\r\n") * 70


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def serve(tmp_path):
    servers = Servers(tmp_path)

    def start(listeners=None, tls=None, server=None, **smtp):
        smtp_server, lines, config = servers.start(listeners, server=server, smtp=smtp, tls=tls)
        return smtp_server, lines, next(iter(smtp_server.listeners.values())).port, config.queue_path

    yield start
    servers.close(grace=2)


def stored(path: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("select count(*) from messages").fetchone()[0]


def certificate(ca, tmp_path) -> dict:
    cert = tmp_path / "cert.pem"
    ca.issue_cert("mx.test.example", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    return {"certificates": [{"cert_file": str(cert)}]}


def client_context(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def session_threads_used(server) -> int:
    """How many of the server's session threads have served a session (they wait, idle, for
    the next one afterwards)."""
    return server.threads.idle()


def test_listeners_are_loops_but_those_behind_a_proxy(serve, ca, tmp_path):
    server, _lines, _port, _path = serve(
        listeners=[{"address": "127.0.0.1:0", "role": "mx"},
                   {"address": "127.0.0.2:0", "role": "submissions"},
                   {"address": "127.0.0.3:0", "role": "mx", "proxy_protocol": True}],
        tls=certificate(ca, tmp_path), server={"proxy_networks": ["127.0.0.0/8"]},
    )
    kinds = {address.split(":")[0]: type(listener) for address, listener in server.listeners.items()}
    assert kinds == {"127.0.0.1": LoopListener, "127.0.0.2": LoopListener, "127.0.0.3": ListenerServer}


def test_messages_from_parallel_clients_are_stored_each_with_its_reply(serve):
    server, lines, port, path = serve()
    errors: list[BaseException] = []

    def client():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                for _ in range(5):  # several messages on one connection
                    s.sendmail("a@example.org", ["b@example.com"], MESSAGE)
        except Exception as exc:  # noqa: BLE001 -- reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert stored(path) == 50
    assert server.connections.wait_idle(5)
    log = "".join(lines)
    assert log.count(" disconnect ") == 10


def test_pipelined_commands_and_a_large_message(serve):
    _server, _lines, port, path = serve()
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        # MAIL, RCPT and DATA in one write: three replies in order (RFC 2920)
        c.sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        c.sock.sendall((b"y" * 98 + b"\r\n") * 30_000 + b".\r\nNOOP\r\n")  # 3 MB, and a command behind it
        code, text = c.reply()
        assert code == 250 and "queued as" in text
        assert c.reply()[0] == 250  # the NOOP, read while the message was being stored
        assert c.cmd("QUIT")[0] == 221
    assert stored(path) == 1


class SlowReader(RawClient):
    """A client with a small receive buffer, so the server's replies back up."""

    def __init__(self, host: str, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(30)
        self.sock.connect((host, port))
        self._buf = b""
        self.greeting = self.reply()


def test_a_client_that_does_not_read_stops_only_its_own_session(serve, monkeypatch):
    waits_to_write = threading.Event()
    original = LoopListener._want

    def spy(self, conn, mask):
        if mask == loop_mod._WRITE:
            waits_to_write.set()
        return original(self, conn, mask)

    monkeypatch.setattr(LoopListener, "_want", spy)
    _server, _lines, port, _path = serve()
    n = 60_000  # some 10 MB of EHLO replies
    with SlowReader("127.0.0.1", port) as slow:
        sender = threading.Thread(target=slow.sock.sendall, args=(b"EHLO c.example\r\n" * n,), daemon=True)
        sender.start()
        assert waits_to_write.wait(10)  # its replies back up: the loop waits to write them
        with RawClient("127.0.0.1", port) as other:  # and serves another client meanwhile
            assert other.cmd("EHLO other.example")[0] == 250
        codes = [slow.reply()[0] for _ in range(n)]
        sender.join(30)
        assert codes == [250] * n
        assert slow.cmd("QUIT")[0] == 221


def test_a_silent_client_is_told_421_after_the_command_timeout(serve):
    _server, lines, port, _path = serve(command_timeout=1)
    with RawClient("127.0.0.1", port) as c:
        code, text = c.reply()
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert c.closed_by_server()
    # The loop's per-read timeout or the deadlines thread, whichever looks first: the same 421.
    wait_for(lambda: " timeout " in "".join(lines), 5)
    assert "limit=silence" in "".join(lines) or "limit=deadline" in "".join(lines)


def test_stop_tells_open_sessions_421_and_closes_the_port(serve):
    server, _lines, port, _path = serve()
    c = RawClient("127.0.0.1", port)
    assert c.cmd("EHLO c.example")[0] == 250
    server.stop(grace=0.2)
    assert c.reply()[0] == 421
    c.sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_starttls_in_the_loop_and_a_message_over_tls(serve, ca, tmp_path):
    server, lines, port, path = serve(tls=certificate(ca, tmp_path))
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.example", timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        s.starttls(context=client_context(ca))
        s.ehlo()
        assert not s.has_extn("starttls")
        s.sendmail("a@example.org", ["b@example.com"], MESSAGE * 300)  # 1.5 MB: many TLS records
        assert s.noop()[0] == 250
    assert stored(path) == 1
    wait_for(lambda: " tls " in "".join(lines) and " disconnect " in "".join(lines), 5)
    assert session_threads_used(server) == 0  # no session thread served it


def test_implicit_tls_in_the_loop(serve, ca, tmp_path):
    _server, lines, port, path = serve(
        listeners=[{"address": "127.0.0.1:0", "role": "submissions"}], tls=certificate(ca, tmp_path))
    with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="c.example", timeout=10,
                          context=client_context(ca)) as s:
        assert s.ehlo()[0] == 250
        assert s.noop()[0] == 250
    wait_for(lambda: " disconnect " in "".join(lines), 5)
    assert " tls " in "".join(lines)


def test_a_failed_handshake_ends_only_that_session(serve, ca, tmp_path):
    server, lines, port, _path = serve(tls=certificate(ca, tmp_path))
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.sock.sendall(b"EHLO this is not a TLS ClientHello\r\n" * 4)
        assert c.closed_by_server()
    wait_for(lambda: " tls_failed " in "".join(lines), 5)
    assert server.connections.wait_idle(5)
    with RawClient("127.0.0.1", port) as c:  # the loop goes on
        assert c.cmd("EHLO c.example")[0] == 250


def test_a_client_silent_after_starttls_is_closed_at_the_command_timeout(serve, ca, tmp_path):
    server, lines, port, _path = serve(tls=certificate(ca, tmp_path), command_timeout=1)
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        # It never starts the handshake: ended as on the threaded path, without a 421 in clear.
        wait_for(lambda: " tls_failed " in "".join(lines), 10)
        assert c.closed_by_server()
    assert "timed out" in next(line for line in lines if " tls_failed " in line)
    assert server.connections.wait_idle(5)


def test_greet_pause_in_the_loop_refuses_an_early_talker_and_greets_a_patient_client(serve):
    server, lines, port, _path = serve(greet_pause=0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO early.example\r\n")  # before the greeting
        reply = sock.recv(1024)
        assert reply.startswith(b"554 5.5.0 "), reply
    with RawClient("127.0.0.1", port) as c:  # waits for the greeting
        assert c.greeting[0] == 220
        assert c.cmd("EHLO c.example")[0] == 250
    assert server.connections.wait_idle(5)
    assert session_threads_used(server) == 0
    assert " sync_error " in "".join(lines)


def test_a_commit_that_does_not_come_is_a_451_and_nothing_is_stored(serve, monkeypatch):
    monkeypatch.setattr(loop_mod, "ENQUEUE_TIMEOUT", 0.5)
    server, lines, port, path = serve()
    gate, in_commit = threading.Event(), threading.Event()
    original = Store._commit

    def stuck(self, batch):  # the writer hangs (a disk that stopped answering)
        in_commit.set()
        gate.wait(20)
        return original(self, batch)

    first = RawClient("127.0.0.1", port)
    try:
        monkeypatch.setattr(Store, "_commit", stuck)
        assert first.cmd("EHLO c.example")[0] == 250
        first.cmd("MAIL FROM:<a@example.org>")
        first.cmd("RCPT TO:<b@example.com>")
        assert first.cmd("DATA")[0] == 354
        first.sock.sendall(b"Subject: one\r\n\r\nbody\r\n.\r\n")
        assert in_commit.wait(10)  # the writer has the first message
        with RawClient("127.0.0.1", port) as second:  # behind it in the writer's queue
            second.cmd("EHLO c.example")
            second.cmd("MAIL FROM:<a@example.org>")
            second.cmd("RCPT TO:<b@example.com>")
            assert second.cmd("DATA")[0] == 354
            second.sock.sendall(b"Subject: two\r\n\r\nbody\r\n.\r\n")
            code, text = second.reply()
            assert (code, text.split()[0]) == (451, "4.3.0")  # given up before the writer took it
            gate.set()
            code, text = first.reply()  # the writer had it: its commit decides
            assert code == 250
    finally:
        gate.set()
        first.sock.close()
    assert stored(path) == 1


def test_a_bug_in_one_session_is_a_451_and_the_loop_serves_the_next(serve):
    import dataclasses

    server, lines, port, _path = serve()

    def broken_new_id() -> str:
        raise RuntimeError("simulated bug")

    good = server.services
    server.services = dataclasses.replace(good, new_id=broken_new_id)
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        code, text = c.cmd("MAIL FROM:<a@example.org>")
        assert (code, text.split()[0]) == (451, "4.3.0")
        assert c.closed_by_server()
    server.services = good
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert server.connections.wait_idle(5)
    assert server.connections.count() == 0


def test_an_accept_error_pauses_accepting_is_logged_once_and_the_client_is_served_after(serve):
    server, lines, port, _path = serve()
    listener = next(iter(server.listeners.values()))
    real, failures = listener.socket, [5]

    class OutOfFiles:
        """The listening socket while the process has no file descriptor left."""

        def fileno(self):
            return real.fileno()

        def accept(self):
            if failures[0]:
                failures[0] -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return real.accept()

        def close(self):
            real.close()

    listener.socket = OutOfFiles()
    with RawClient("127.0.0.1", port) as c:  # waits in the backlog through the five failures
        assert c.cmd("EHLO c.example")[0] == 250
    assert failures == [0]
    assert sum(" accept_error " in line for line in lines) == 1  # five failures in under a second


def test_a_bug_outside_any_session_is_logged_and_the_loop_goes_on(serve, monkeypatch):
    server, lines, port, _path = serve()
    original, broken = LoopListener._sweep, [True]

    def sweep(self, now):
        if broken[0]:
            broken[0] = False
            raise RuntimeError("simulated bug in the sweep")
        return original(self, now)

    monkeypatch.setattr(LoopListener, "_sweep", sweep)
    wait_for(lambda: not broken[0], 10, what="the broken sweep to run")
    wait_for(lambda: "simulated bug in the sweep" in "".join(lines), 5)
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250


def test_a_client_that_never_reads_its_replies_loses_its_slot_after_the_command_timeout(serve):
    server, lines, port, _path = serve(command_timeout=1)
    with SlowReader("127.0.0.1", port) as stuck:
        stuck.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # EHLOs until the server stops reading: its replies fill both buffers
                stuck.sock.send(b"EHLO c.example\r\n" * 1000)
        wait_for(lambda: " io_error " in "".join(lines), 15, what="the send timeout")
        assert "send timed out" in "".join(lines)
        assert server.connections.wait_idle(5)  # the slot is free again


def test_a_session_on_a_submission_port_with_auth_gets_a_thread_of_its_own(serve):
    server, _lines, _port, _path = serve(listeners=[{"address": "127.0.0.1:0", "role": "mx"},
                                                    {"address": "127.0.0.2:0", "role": "submission"}])
    ports = {s.listener.role: s.port for s in server.listeners.values()}
    with RawClient("127.0.0.1", ports["mx"]) as c:  # in the loop
        assert c.cmd("EHLO c.example")[0] == 250
    assert server.connections.wait_idle(5)
    assert session_threads_used(server) == 0
    with RawClient("127.0.0.2", ports["submission"]) as c:  # AUTH's password check may take its time
        assert c.cmd("EHLO c.example")[0] == 250
    wait_for(lambda: session_threads_used(server) == 1, 5, what="the session thread to be idle again")


def test_more_input_sees_bytes_waiting_in_the_kernel_and_an_empty_socket():
    # After a 354 the loop asks whether the client already sent message text (RFC 2920 §3.1).
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        conn = type("Conn", (), {"sock": ours, "tls": False})()
        assert LoopListener._more_input(conn) is False
        theirs.sendall(b"Subject: early\r\n")
        wait_for(lambda: LoopListener._more_input(conn), timeout=5)
        assert ours.recv(100) == b"Subject: early\r\n"  # only looked at, not taken
        assert LoopListener._more_input(conn) is False
        theirs.close()
        assert LoopListener._more_input(conn) is False  # the end of input is no text


def test_a_connection_in_the_loop_has_nagle_off_from_its_listener(serve):
    # TCP_NODELAY is set once, on the listening socket; the kernel gives it to each connection.
    server, _lines, port, _path = serve()
    listener = next(iter(server.listeners.values()))
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd("EHLO c.example")[0] == 250
        (conn,) = listener.conns.values()
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
