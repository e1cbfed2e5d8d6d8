"""sd_notify as systemd sees it: a datagram socket named by NOTIFY_SOCKET, read here while the
real daemon starts, reloads, pings its watchdog and stops.  Also the PID file and its lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from elemta import pidfile, sdnotify
from tests.support import ELEMTA, Daemon, wait_for

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
@SERVER@
"""


class Systemd:
    """The notification socket's reader side."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def read(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def wait(self, key: str, count: int = 1) -> list[dict[str, str]]:
        return wait_for(lambda: len([m for m in self.read() if key in m]) >= count and self.messages,
                        what=f"{count} x {key}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    notify = Systemd(tmp_path / "notify")
    yield notify
    notify.close()


@pytest.mark.parametrize("server", ["", "delivery_process = false"])
def test_ready_reloading_stopping_and_the_watchdog(tmp_path, systemd, server):
    daemon = Daemon(tmp_path, CONFIG.replace("@SERVER@", server),
                    env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "200000"}).start()
    try:
        messages = systemd.wait("READY")
        ready = next(m for m in messages if "READY" in m)
        assert ready["MAINPID"] == str(daemon.proc.pid)
        assert "port(s)" in ready["STATUS"]
        systemd.wait("WATCHDOG", 3)  # every 0.1 s (half of WATCHDOG_USEC)
        daemon.signal(signal.SIGHUP)
        messages = systemd.wait("RELOADING")
        reloading = next(i for i, m in enumerate(messages) if "RELOADING" in m)
        wait_for(lambda: any("READY" in m for m in systemd.read()[reloading:]), what="READY after the reload")
        assert int(messages[reloading]["MONOTONIC_USEC"]) > 0
    finally:
        assert daemon.stop() == 0
    messages = systemd.wait("STOPPING")
    # Only the main process talks to systemd (NotifyAccess=main): children forgot the socket.
    assert {m.get("MAINPID") for m in messages if "MAINPID" in m} == {str(daemon.proc.pid)}


def test_without_notify_socket_nothing_is_sent():
    notifier = sdnotify.Notifier({})
    assert not notifier.enabled and notifier.send("READY=1") is False
    notifier.watchdog()  # no interval: nothing


def test_an_abstract_socket_name_and_a_watchdog_for_another_pid(tmp_path):
    name = f"elemta-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = sdnotify.Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000",
                                      "WATCHDOG_PID": str(os.getpid() + 1)})
        assert notifier.watchdog_interval == 0.0  # the watchdog is another process's
        notifier.status("busy")
        assert sock.recv(100) == b"STATUS=busy"


def test_the_pid_file_keeps_a_second_daemon_off_the_spool(tmp_path):
    first = Daemon(tmp_path, CONFIG.replace("@SERVER@", "")).start()
    try:
        assert pidfile.read_pid(str(first.spool)) == first.proc.pid
        second = subprocess.run([str(ELEMTA), "--config", str(first.config_path)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 73
        assert second.stderr.splitlines() == [
            f"elemta: server.spool_dir: another elemta (PID {first.proc.pid}) runs on this spool"]
    finally:
        first.stop()
    assert not (first.spool / pidfile.NAME).exists()
    assert pidfile.read_pid(str(first.spool)) is None


def test_a_pid_file_left_by_a_killed_daemon_is_taken_over(tmp_path):
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / pidfile.NAME).write_text("999999\n")
    assert pidfile.read_pid(str(tmp_path / "spool")) is None  # no one holds its lock
    daemon = Daemon(tmp_path, CONFIG.replace("@SERVER@", "")).start()
    try:
        assert (daemon.spool / pidfile.NAME).read_text() == f"{daemon.proc.pid}\n"
    finally:
        daemon.stop()
