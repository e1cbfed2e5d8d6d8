"""The connections a listener process holds: counted in all and per client address, with
their sockets, so the caps can be checked at accept and every session woken at shutdown."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

from elemta.smtp import replies

if TYPE_CHECKING:
    from elemta.smtp.server import Limits


class Connections:
    """Counts open connections, globally and per client address, and keeps their sockets."""

    def __init__(self):
        self._lock = threading.Lock()
        self._per_ip: dict[str, int] = {}
        self._open: dict[int, list] = {}  # number -> [socket, the address it counts under]
        self._serial = 0
        self.idle = threading.Condition(self._lock)

    def admit(
        self, ip: str, sock: socket.socket, limits: Limits, per_ip: bool = True
    ) -> tuple[int, replies.Reply | None]:
        """Return (connection number, None) if admitted, else (0, the 421 to send).

        per_ip=False skips the per-address cap (a proxy's address: rekey() applies it to the
        client the PROXY header names)."""
        with self._lock:
            if len(self._open) >= limits.max_connections:
                return 0, replies.TOO_MANY_CONNECTIONS
            if per_ip and self._per_ip.get(ip, 0) >= limits.max_connections_per_ip:
                return 0, replies.TOO_MANY_FROM_IP
            self._serial += 1
            if per_ip:
                self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            # Not counted per address until rekey() names the client behind the proxy.
            self._open[self._serial] = [sock, ip if per_ip else None]
            return self._serial, None

    def rekey(self, number: int, ip: str, limits: Limits) -> replies.Reply | None:
        """Count connection number under ip (the client a PROXY header names) from now on."""
        with self._lock:
            entry = self._open.get(number)
            if entry is None:
                return None
            if entry[1] == ip:
                return None
            if self._per_ip.get(ip, 0) >= limits.max_connections_per_ip:
                return replies.TOO_MANY_FROM_IP
            self._drop(entry[1])
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            entry[1] = ip
            return None

    def replace(self, number: int, sock: socket.socket) -> None:
        """The connection's socket is now sock (TLS wraps it), for interrupt_all."""
        with self._lock:
            if number in self._open:
                self._open[number][0] = sock

    def release(self, number: int) -> None:
        with self._lock:
            entry = self._open.pop(number, None)
            if entry is not None:
                self._drop(entry[1])
            if not self._open:
                self.idle.notify_all()

    def _drop(self, ip: str | None) -> None:
        if ip is None:
            return
        left = self._per_ip.get(ip, 1) - 1
        if left:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self.idle.wait_for(lambda: not self._open, timeout)

    def interrupt_all(self) -> None:
        """Wake every session blocked in recv: it then says 421 and closes (shutdown)."""
        with self._lock:
            sockets = [entry[0] for entry in self._open.values()]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RD)
            except (OSError, ValueError):
                pass
