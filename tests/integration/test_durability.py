"""Durability: clients send concurrently, the daemon is killed with SIGKILL at a random moment,
restarted, and every message whose 250 a client saw must be in the queue, byte for byte.

Each round is bounded: the clients stop on the first connection error (the kill), and the
kill comes after a random number of acknowledged messages, not after a sleep.
"""

from __future__ import annotations

import random
import smtplib
import threading

from tests.support import Daemon, wait_for

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
max_connections_per_ip = 100
# One process, so SIGKILL hits the process that holds the sessions (a supervisor's children
# would get SIGTERM and stop cleanly).
delivery_process = false

[smtp]
local_domains = ["example.com"]

[queue]
min_free_space = 0

# These tests are about intake: keep the mail in the queue.
[delivery]
hold = true
"""

CLIENTS = 8
ROUNDS = 4


def sender(port: int, client: int, acked: dict, lock: threading.Lock, stop: threading.Event) -> None:
    serial = 0
    while not stop.is_set():
        serial += 1
        body = (
            f"Subject: client {client} message {serial}\r\n\r\n".encode()
            + bytes(random.randrange(32, 127) for _ in range(random.randrange(100, 20000)))
            + b"\r\n"
        )
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("durable.example")
                smtp.mail("sender@example.org")
                smtp.rcpt("user@example.com")
                code, text = smtp.data(body)
        except (OSError, smtplib.SMTPException):
            return  # the daemon is gone: anything not acknowledged is the client's to retry
        if code == 250:
            queue_id = text.decode().rsplit(" ", 1)[1]
            with lock:
                acked[queue_id] = body


def test_acknowledged_mail_survives_kill_9(tmp_path):
    daemon = Daemon(tmp_path, CONFIG)
    try:
        kill_and_check(daemon)
    finally:
        daemon.kill()


def kill_and_check(daemon: Daemon) -> None:
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    rng = random.Random()
    for round_number in range(ROUNDS):
        daemon.start()
        stop = threading.Event()
        threads = [
            threading.Thread(target=sender, args=(daemon.port, i, acked, lock, stop), daemon=True)
            for i in range(CLIENTS)
        ]
        already = len(acked)
        for thread in threads:
            thread.start()
        target = already + rng.randrange(5, 60)
        wait_for(lambda target=target: len(acked) >= target, 60, what=f"{target} acknowledged messages")
        daemon.kill()
        stop.set()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        # Restart on the same spool: every acknowledged message is there, intact.
        daemon.start()
        stored = {row["queue_id"] for row in daemon.messages()}
        missing = set(acked) - stored
        assert not missing, f"round {round_number}: acknowledged but lost: {sorted(missing)}"
        for queue_id, body in acked.items():
            assert daemon.body(queue_id).endswith(body), f"{queue_id} differs"
            assert [r["state"] for r in daemon.recipients(queue_id)] == ["held"]
        assert daemon.stop() == 0
    assert len(acked) >= ROUNDS * 5
