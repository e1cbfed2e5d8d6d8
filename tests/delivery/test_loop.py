"""delivery/loop.py: transactions driven by the delivery loop, against real servers on 127.0.0.1.

The same servers as test_smtp_client.py (aiosmtpd, the scripted peers); each transaction is
SmtpConnection.send_steps() run as a loop task: it starts on the test's thread, which writes
what it can and leaves every wait to the loop, and what may block (SLOW) goes to a pool.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from elemta.delivery.loop import DeliveryLoop, Task
from elemta.delivery.smtp_client import SmtpClientError
from elemta.delivery.steps import SLOW, run
from tests.delivery.test_smtp_client import (
    BIG,
    Recorder,
    connect,
    esmtp,
    lmtp_gone_after_one_reply,
    message,
    stops_reading_after_354,
)
from tests.mx import Handler
from tests.support import wait_for


class Ended:
    """What a task's done() got, and on which thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value = self.error = None
        self.thread = 0

    def __call__(self, value, error):
        self.value, self.error, self.thread = value, error, threading.get_ident()
        self.event.set()
        return None

    def wait(self, timeout: float = 10):
        assert self.event.wait(timeout), "the task did not end"
        return self


@pytest.fixture
def loop():
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-pool")
    offloaded: list[int] = []

    def offload(fn):
        offloaded.append(1)
        pool.submit(fn)

    errors: list[BaseException] = []
    loop = DeliveryLoop(offload, errors.append)
    loop.offloaded = offloaded  # type: ignore[attr-defined]
    loop.start()
    yield loop
    loop.stop()
    pool.shutdown(wait=True)
    assert errors == []


def send(loop, conn, msg) -> Ended:
    ended = Ended()
    loop.run(Task(conn.send_steps(msg), ended))
    return ended.wait()


def test_a_message_of_megabytes_goes_through_the_loop_exactly(loop, aiosmtpd):
    """More than the socket buffers hold: the loop waits for writable between blocks."""
    handler = Recorder()
    server = aiosmtpd(handler)
    conn = connect(server.port)
    body = b"Subject: big\r\n\r\n" + b"".join(b".line %d\r\n" % i + b"z" * 990 + b"\r\n" for i in range(3000))
    ended = send(loop, conn, message("bob@example.org", body=body))
    assert ended.error is None and [r.is_positive for r in ended.value] == [True]
    assert ended.thread == loop._loop_ident  # the final reply was read there
    assert handler.messages[0]["content"] == body  # dot-stuffed on the wire, unstuffed there
    assert loop.waiting() == 0 and loop.offloaded == []
    conn.close()


def test_two_messages_on_one_tls_connection_through_the_loop(loop, aiosmtpd, server_tls):
    handler = Recorder()
    server = aiosmtpd(handler, tls_context=server_tls)
    conn = connect(server.port, tls_policy="may")
    assert conn.tls is not None
    for rcpt in ("bob@example.org", "carol@example.org"):
        ended = send(loop, conn, message(rcpt))
        assert ended.error is None and ended.value[0].is_positive
    # and the blocking driver takes the same connection on afterwards
    assert conn.send(message("dave@example.org"))[0].is_positive
    assert [m["rcpts"] for m in handler.messages] == [["bob@example.org"], ["carol@example.org"],
                                                      ["dave@example.org"]]
    conn.close()


def test_a_dripping_reply_times_out_at_its_deadline_on_the_loop(loop, scripted):
    """A byte every 50 ms: each wait is short, the reply never ends, and the loop's deadline
    for the whole reply ends it, as the blocking client's does."""
    def script(peer):
        peer.send("220 fake.test ESMTP")
        peer.line()
        peer.send("250-fake.test", "250 PIPELINING")
        for _ in range(3):
            peer.line()
        peer.send("250 2.1.0 ok", "250 2.1.5 ok", "354 go")
        peer.data()
        peer.wfile.write(b"250 ")
        while not peer.server.release.wait(0.05):
            peer.wfile.write(b"x")

    server = scripted(script)
    conn = connect(server.port, command_timeout=0.3)
    ended = send(loop, conn, message("bob@example.org"))
    assert isinstance(ended.error, SmtpClientError)
    assert (ended.error.stage, ended.error.try_next_host) == ("data", True)
    assert "timed out" in str(ended.error)
    assert not conn.usable() and loop.waiting() == 0


def test_a_peer_that_stops_reading_times_out_the_send_on_the_loop(loop, scripted):
    server = scripted(stops_reading_after_354)
    conn = connect(server.port, command_timeout=0.3)
    ended = send(loop, conn, message("bob@example.org", body=BIG))
    assert isinstance(ended.error, SmtpClientError)
    assert (ended.error.stage, ended.error.try_next_host) == ("data", True)
    assert "timed out" in str(ended.error)


def test_a_421_on_the_loop_closes_the_connection_and_raises(loop, scripted):
    server = scripted(esmtp(rcpt={"carol@example.org": "421 4.3.2 shutting down"}))
    conn = connect(server.port)
    ended = send(loop, conn, message("bob@example.org", "carol@example.org"))
    assert isinstance(ended.error, SmtpClientError)
    assert (ended.error.stage, ended.error.reply.code) == ("rcpt", 421)
    assert not conn.usable() and loop.offloaded == []


def test_what_waits_for_the_server_outside_a_transaction_goes_to_the_pool(loop, scripted):
    """No recipient accepted: the transaction ends with RSET, a blocking call (SLOW), which
    the loop hands to the pool; the connection is still good afterwards."""
    server = scripted(esmtp(rcpt={"bob@example.org": "450 4.2.1 try later"}))
    conn = connect(server.port)
    ended = send(loop, conn, message("bob@example.org"))
    assert ended.error is None and ended.value[0].is_transient
    assert loop.offloaded == [1]
    assert ended.thread != loop._loop_ident  # ended on the pool's thread
    assert "RSET" in server.received and conn.usable()
    conn.close()


def test_lmtp_replies_that_stop_half_way_on_the_loop_keep_those_given(loop, scripted):
    server = scripted(lmtp_gone_after_one_reply)
    conn = connect(server.port, lmtp=True)
    ended = send(loop, conn, message("bob@example.org", "carol@example.org"))
    assert ended.error is None
    assert [r.is_positive for r in ended.value] == [True, False] and ended.value[1].is_transient
    assert not conn.usable()


def test_a_task_started_from_another_thread_runs_on_the_loop(loop, aiosmtpd):
    handler = Recorder()
    conn = connect(aiosmtpd(handler).port)
    ended = Ended()
    loop.call(Task(conn.send_steps(message("bob@example.org")), ended))
    ended.wait()
    assert ended.error is None and ended.value[0].is_positive
    wait_for(lambda: len(handler.messages) == 1, 5, what="the message at the server")
    conn.close()


def test_the_blocking_driver_runs_slow_in_place():
    def steps():
        yield SLOW
        yield SLOW
        return "done"

    assert run(steps()) == "done"


def test_a_slow_server_within_the_command_timeout_is_waited_for(loop, aiosmtpd):
    """The deadline is each reply's own: a final reply 1.5 s late (past the loop's one-second
    look at deadlines) is taken when the timeout is 10 s."""
    handler = Handler()
    handler.data_delay = 1.5
    conn = connect(aiosmtpd(handler).port, command_timeout=10.0)
    ended = send(loop, conn, message("bob@example.org"))
    assert ended.error is None and ended.value[0].is_positive
    conn.close()


def test_a_stop_gives_up_the_waits_and_closes_their_connections(loop, scripted):
    """Past the scheduler's grace: the reply never comes, the wait is given up, the socket
    closed, and the task left unfinished (its lease brings the recipients back)."""
    def script(peer):
        peer.send("220 fake.test ESMTP")
        peer.line()
        peer.send("250-fake.test", "250 PIPELINING")
        peer.line()  # MAIL, never answered
        peer.server.release.wait(10)

    server = scripted(script)
    conn = connect(server.port)
    ended = Ended()
    loop.run(Task(conn.send_steps(message("bob@example.org")), ended))
    wait_for(lambda: loop.waiting() == 1, 5, what="the transaction waiting on the loop")
    loop.stop()
    assert loop.waiting() == 0 and not conn.usable() and conn.sock is None
    assert not ended.event.is_set()
    # a wait asked for after the stop is given up at once
    conn2 = connect(server.port)
    loop.run(Task(conn2.send_steps(message("bob@example.org")), ended))
    assert conn2.sock is None and not ended.event.is_set()


def test_steps_that_raise_systemexit_still_end_their_task_and_the_exit_goes_on(loop):
    """done() frees the delivery's slot whatever ends its steps; SystemExit is not swallowed."""
    def steps():
        yield SLOW
        raise SystemExit(3)

    ended = Ended()
    with pytest.raises(SystemExit):
        loop.run(Task(steps(), ended))
    assert isinstance(ended.wait().error, SystemExit)
