"""systemd's notification protocol (sd_notify(3)), written to $NOTIFY_SOCKET as one datagram.

The unit is Type=notify: systemd counts elemta as started at READY=1 (every listener bound,
the queue open), sees reloads (RELOADING=1 ... READY=1) and the stop (STOPPING=1), shows the
STATUS= line in `systemctl status`, and, with WatchdogSec=, restarts a main loop that stopped
sending WATCHDOG=1.  Only the main process (the supervisor, or a lone daemon) talks to
systemd; forked children forget the socket (NotifyAccess=main would drop their messages).
Without $NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self.address = address if address.startswith(("/", "\0")) else ""
        self.watchdog_interval = 0.0
        usec = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        if usec.isascii() and usec.isdigit() and int(usec) > 0 and owner in ("", str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6  # ping twice per period, as systemd advises
        self._next_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send KEY=VALUE lines; False when there is no socket or it cannot be reached."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode("utf-8", "replace"))
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd 253+ match the reload to its request; older ones ignore it.
        self.send("RELOADING=1", "STATUS=reloading the configuration",
                  f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing open sessions and deliveries")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Call from the main loop as often as it runs: pings when one is due."""
        if not self.watchdog_interval:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval
            self.send("WATCHDOG=1")

    def forget(self) -> None:
        """In a forked child: never talk to systemd, and do not pass the socket on."""
        self.address = ""
        self.watchdog_interval = 0.0
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
