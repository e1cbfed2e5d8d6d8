"""A slow-client flood against the real daemon (issue 16, defect 1).

1,500 connections from 150 loopback addresses, each sending one byte every 2 to 4 s and
reconnecting when closed, as the probe that found the defect did. Before whole deadlines,
reserved slots and stress mode they held all 1,000 slots and a client in the trusted
networks got 421 4.7.0 for 100 of 100 messages. Now: all 100 accepted; the flood is held
to its share, its sessions are cut under stress, and the session threads go away after it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import selectors
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support import Daemon, wait_for

ADDRESSES = [f"127.0.1.{n}" for n in range(1, 151)]
PER_ADDRESS = 10
IDLE_THREADS_KEPT = 64  # smtp/threads.py's max_idle

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"

[smtp]
local_domains = ["example.com"]
trusted_networks = ["127.0.0.1/32"]

[delivery]
hold = true

[queue]
min_free_space = 0
"""


class Flood:
    """One thread, one epoll: many slow clients that come back when they are closed."""

    def __init__(self, port: int):
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.greeted = 0  # open connections that got a 220
        self.replies: dict[str, int] = {}  # "421 4.7.0" etc. -> how many
        self.thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self._comeback: list[tuple[float, str]] = []

    def start(self) -> Flood:
        for source in ADDRESSES:
            for _ in range(PER_ADDRESS):
                self._comeback.append((0.0, source))
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def _open(self, source: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._comeback.append((time.monotonic() + 0.5, source))
            return
        state = {"source": source, "greeted": False, "next": time.monotonic() + random.uniform(2, 4)}
        self.selector.register(sock, selectors.EVENT_READ, state)

    def _closed(self, sock: socket.socket, state: dict) -> None:
        self.selector.unregister(sock)
        sock.close()
        if state["greeted"]:
            self.greeted -= 1
        self._comeback.append((time.monotonic() + 0.5, state["source"]))

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                due = [item for item in self._comeback if item[0] <= now]
                self._comeback = [item for item in self._comeback if item[0] > now]
                for _, source in due:
                    self._open(source)
                for key, _ in self.selector.select(timeout=0.1):
                    self._read(key.fileobj, key.data)
                now = time.monotonic()
                for key in list(self.selector.get_map().values()):
                    state = key.data
                    if state["greeted"] and now >= state["next"]:
                        state["next"] = now + random.uniform(2, 4)
                        try:
                            key.fileobj.send(b"E")  # one byte of a command that never ends
                        except OSError:
                            self._closed(key.fileobj, state)
        finally:
            for key in list(self.selector.get_map().values()):
                key.fileobj.close()
            self.selector.close()

    def _read(self, sock: socket.socket, state: dict) -> None:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        for line in data.split(b"\r\n"):
            if line.startswith(b"220") and not state["greeted"]:
                state["greeted"] = True
                self.greeted += 1
            elif line.startswith(b"4"):
                key = line[:9].decode()
                self.replies[key] = self.replies.get(key, 0) + 1
        if not data:
            self._closed(sock, state)


def smtp_worker_pid(daemon: Daemon) -> int:
    """The SMTP worker's PID, from the supervisor's status.json (monitor.py)."""
    status = daemon.spool / "monitor" / "status.json"

    def worker() -> int | None:
        try:
            children = json.loads(status.read_text())["children"]
        except (OSError, ValueError):
            return None
        return next((c["pid"] for c in children if c["role"] == "smtp"), None)

    return wait_for(worker, 10, what="the SMTP worker in status.json")


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture
def enough_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = len(ADDRESSES) * PER_ADDRESS + 500
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} files the flood needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_slow_client_flood_does_not_lock_out_the_trusted_network(tmp_path: Path, enough_files):
    daemon = Daemon(tmp_path, CONFIG).start()
    flood = None
    try:
        worker = smtp_worker_pid(daemon)
        flood = Flood(daemon.port).start()
        # Port 25's share: max_connections (1000) less reserved_connections (100).
        wait_for(lambda: flood.greeted >= 880, 90, what="the flood to hold port 25's slots")
        wait_for(lambda: flood.replies.get("421 4.7.0", 0) > 0, 30,
                 what="the flood to be refused at the cap")
        accepted = 0
        for n in range(100):
            with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="admin.example", timeout=30) as client:
                refused = client.sendmail("cron@example.com", ["root@example.com"],
                                          f"Subject: report {n}\r\n\r\nall well\r\n")
                accepted += not refused
        assert accepted == 100
        wait_for(lambda: "stress state=on" in daemon.log_text(), 10, what="stress mode")
        # Stress mode: the flood's sessions, idle strangers, end long before command_timeout.
        wait_for(lambda: flood.replies.get("421 4.4.2", 0) >= 100, 60, what="stress timeouts")
        peak = threads_of(worker)
        flood.close()
        flood_replies = dict(flood.replies)
        flood = None
        wait_for(lambda: "stress state=off" in daemon.log_text(), 60, what="stress to end")
        wait_for(lambda: threads_of(worker) <= IDLE_THREADS_KEPT + 10, 60,
                 what=f"idle session threads to be released (peak {peak})")
        assert len(daemon.messages()) == 100
        print(f"\nflood: {flood_replies} refused or cut; worker threads peak {peak}, "
              f"after {threads_of(worker)}")
    finally:
        if flood is not None:
            flood.close()
        daemon.stop()
