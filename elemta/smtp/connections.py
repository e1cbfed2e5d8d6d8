"""The connections a listener process holds: counted in all and per client address, with
their sockets, so the caps can be checked at accept, every session's deadline kept, and every
session woken at shutdown.

Deadlines are whole: a command line must be complete within `command_timeout` of the reply
before it, and DATA text within `data_timeout` plus one second per `min_data_rate` octets
received (Postfix's smtpd_per_request_deadline and smtpd_min_data_rate). A client dripping a
byte every few seconds never trips a per-read timeout, so the kernel's SO_RCVTIMEO alone let
1,500 such connections hold every slot; `sweep()` (a thread of the server, once a second)
wakes the sessions past their deadline. Under pressure (three quarters of the slots taken)
sessions of untrusted, unauthenticated clients get `stress_timeout` instead, as in Postfix's
stress mode, and the last `reserved` slots are only for trusted networks and submission
listeners.

The counts behind the caps (all connections, connections per client address) are kept in
memory the worker processes share (shm.Counts, one column per worker), so
`server.max_connections` and `server.max_connections_per_ip` hold for all workers together
whichever worker the kernel hands a connection to. Stress is judged on that total too.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field

from elemta.shm import Counts, Region, RegionFull
from elemta.smtp import replies

TRUSTED_CACHE = 4096  # client addresses whose is_trusted answer is kept


@dataclass(frozen=True)
class Limits:
    """Per-connection settings that a reload (SIGHUP) may change; read once per connection."""

    command_timeout: float
    data_timeout: float
    greet_pause: float
    max_connections: int
    max_connections_per_ip: int
    trusted: tuple  # ipaddress networks
    proxies: tuple = ()  # ipaddress networks allowed to send PROXY headers
    reserved: int = 0  # of max_connections, only for trusted clients and submission listeners
    min_data_rate: int = 0  # octets/s; each one received extends the DATA deadline
    stress_timeout: float = 0.0  # deadline under stress for untrusted, unauthenticated sessions
    stress_at: int = 1  # open connections from which the listener process is under stress

    # Answers of is_trusted by address: asked at every connection, where parsing the address
    # cost more than the test. Bounded; a reload makes new Limits, so never stale.
    _trusted_cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def is_trusted(self, ip: str) -> bool:
        known = self._trusted_cache.get(ip)
        if known is None:
            address = ipaddress.ip_address(ip)
            known = any(address in net for net in self.trusted)
            if len(self._trusted_cache) >= TRUSTED_CACHE:
                self._trusted_cache.clear()
            self._trusted_cache[ip] = known
        return known


class Watch:
    """One open connection as the sweeper sees it; the session thread keeps it current.

    The session thread writes the fields without a lock: each is one attribute store, and the
    sweeper only reads them (a stale read costs at most one sweep's delay)."""

    __slots__ = ("data_bytes", "expired", "in_data", "ip", "privileged", "since", "sock", "waiting")

    def __init__(self, sock: socket.socket, ip: str | None, privileged: bool):
        self.sock = sock
        self.ip = ip  # the address it counts under; None until a PROXY header names it
        self.privileged = privileged  # trusted network or authenticated: no stress timeout
        self.since = time.monotonic()  # when the client was last asked for something
        self.data_bytes = 0  # octets of message text received since `since`
        self.in_data = False
        self.waiting = True  # False while elemta itself works (feed, commit): not the client's time
        self.expired = False  # set by sweep(): the session ends with 421 4.4.2

    def asked(self, in_data: bool) -> None:
        """A reply went out (or the greeting): the client's next request starts now."""
        self.since = time.monotonic()
        self.data_bytes = 0
        self.in_data = in_data

    def deadline(self, limits: Limits, stressed: bool) -> float:
        if stressed and not self.privileged and limits.stress_timeout:
            allowed = limits.stress_timeout
        else:
            allowed = limits.data_timeout if self.in_data else limits.command_timeout
        if self.in_data:
            if not limits.min_data_rate:
                return float("inf")  # only the per-read data_timeout applies
            allowed += self.data_bytes / limits.min_data_rate
        return self.since + allowed


class Connections:
    """Counts open connections, globally and per client address, and keeps their sockets."""

    def __init__(self, counts: Counts | None = None, worker: int = 0):
        """counts: the workers' shared table (its column `worker` is this process's); None
        makes a private one, for a process that runs alone."""
        self._lock = threading.Lock()
        self.counts = counts if counts is not None else new_counts(Region(Counts.size_for(1024)), 1024)
        self.worker = worker
        self._open: dict[int, Watch] = {}
        self._serial = 0
        self.idle = threading.Condition(self._lock)
        self.stressed = False

    def admit(
        self, ip: str, sock: socket.socket, limits: Limits, *, per_ip: bool = True,
        reserved: bool = False, privileged: bool = False,
    ) -> tuple[int, Watch | None, replies.Reply | None]:
        """Return (connection number, its Watch, None) if admitted, else (0, None, the 421).

        reserved: the client may take the slots kept for trusted networks and submission.
        per_ip=False skips the per-address cap (a proxy's address: rekey() applies it to the
        client the PROXY header names)."""
        with self._lock:
            cap = limits.max_connections if reserved else limits.max_connections - limits.reserved
            try:
                over = self.counts.admit(self.worker, ip if per_ip else None, cap, limits.max_connections_per_ip)
            except RegionFull:  # more addresses than the table was sized for at start
                return 0, None, replies.TOO_MANY_CONNECTIONS
            if over == "total":
                return 0, None, replies.TOO_MANY_CONNECTIONS
            if over == "key":
                return 0, None, replies.TOO_MANY_FROM_IP
            self._serial += 1
            # Not counted per address until rekey() names the client behind the proxy.
            watch = Watch(sock, ip if per_ip else None, privileged)
            self._open[self._serial] = watch
            return self._serial, watch, None

    def rekey(self, number: int, ip: str, limits: Limits, *, reserved: bool) -> replies.Reply | None:
        """Count connection number under ip (the client a PROXY header names) from now on;
        a client that may not use the reserved slots is refused if it holds one."""
        counts = self.counts
        with self._lock, counts.region:
            watch = self._open.get(number)
            if watch is None:
                return None
            if not reserved and counts.total() > limits.max_connections - limits.reserved:
                return replies.TOO_MANY_CONNECTIONS
            if watch.ip == ip:
                return None
            if counts.of(ip) >= limits.max_connections_per_ip:
                return replies.TOO_MANY_FROM_IP
            try:
                counts.add(self.worker, ip, +1, total=False)
            except RegionFull:
                return replies.TOO_MANY_CONNECTIONS
            if watch.ip is not None:
                counts.add(self.worker, watch.ip, -1, total=False)
            watch.ip = ip
            return None

    def replace(self, number: int, sock: socket.socket) -> None:
        """The connection's socket is now sock (TLS wraps it), for sweep and interrupt_all."""
        with self._lock:
            if number in self._open:
                self._open[number].sock = sock

    def release(self, number: int) -> None:
        with self._lock:
            watch = self._open.pop(number, None)
            if watch is not None:
                self.counts.add(self.worker, watch.ip, -1)
            if not self._open:
                self.idle.notify_all()

    def count(self) -> int:
        """Connections open in this process."""
        with self._lock:
            return len(self._open)

    def total(self) -> int:
        """Connections open in all workers."""
        with self.counts.region:
            return self.counts.total()

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self.idle.wait_for(lambda: not self._open, timeout)

    def sweep(self, limits: Limits, now: float | None = None) -> tuple[int, bool | None]:
        """End the waits that are past their deadline; return (how many, the new stress state
        if it just changed, else None)."""
        with self._lock:
            watches = list(self._open.values())
        stressed = self.total() >= limits.stress_at
        changed = None if stressed == self.stressed else stressed
        self.stressed = stressed
        now = time.monotonic() if now is None else now
        ended = 0
        for watch in watches:
            if watch.waiting and not watch.expired and now > watch.deadline(limits, stressed):
                watch.expired = True
                _wake(watch.sock)
                ended += 1
        return ended, changed

    def interrupt_all(self) -> None:
        """Wake every session blocked in recv: it then says 421 and closes (shutdown)."""
        with self._lock:
            sockets = [watch.sock for watch in self._open.values()]
        for sock in sockets:
            _wake(sock)


def _wake(sock: socket.socket) -> None:
    """Make a recv blocked on sock return b"" (the session then replies and closes).

    socket.socket.shutdown, not SSLSocket.shutdown: that one also drops the TLS state, and
    the session's 421 would go out in the clear inside a TLS stream."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RD)
    except (OSError, ValueError):
        pass


def new_counts(region: Region, capacity: int) -> Counts:
    """The workers' table of open connections, for up to capacity at once (made once, by the
    supervisor: a reload that raises max_connections keeps it, at a higher load)."""
    return Counts(region, "connections", capacity)

