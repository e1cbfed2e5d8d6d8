"""SMTP listeners: socketserver.ThreadingTCPServer, a daemon thread per connection.

This module owns the sockets: it feeds received bytes to a Session, writes the replies,
stores messages through the queue when the session asks, enforces the connection caps and the
timeouts, and lets sessions finish (or tells them 421) when the daemon stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass

from elemta import log as logmod
from elemta.config import Config, Listener, split_host_port
from elemta.errors import QueueError
from elemta.local import LocalRecipients
from elemta.log import EventLog
from elemta.queue.store import Store
from elemta.smtp import replies
from elemta.smtp.session import CLOSED, Client, Enqueue, Services, Session, Settings
from elemta.smtp.threads import SessionThreads

RECV_SIZE = 65536


@dataclass(frozen=True)
class Limits:
    """Per-connection settings that a reload (SIGHUP) may change; read once per connection."""

    command_timeout: float
    data_timeout: float
    greet_pause: float
    max_connections: int
    max_connections_per_ip: int
    trusted: tuple  # ipaddress networks


def session_settings(
    config: Config, listener: Listener, hostname: str | None = None, recipients: LocalRecipients | None = None
) -> Settings:
    smtp = config.smtp
    return Settings(
        hostname=hostname or config.hostname,
        role=listener.role,
        listener=listener.address,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        max_errors=smtp.max_errors,
        max_received_headers=smtp.max_received_headers,
        local_domains=frozenset(smtp.local_domains),
        relay_domains=frozenset(smtp.relay_domains),
        auth_required=smtp.auth_required,
        accept_all=config.dev,
        hold=config.delivery.hold,
        recipients=recipients,
    )


def limits_from(config: Config, workers: int = 1) -> Limits:
    return Limits(
        command_timeout=config.smtp.command_timeout,
        data_timeout=config.smtp.data_timeout,
        greet_pause=config.smtp.greet_pause,
        max_connections=-(-config.server.max_connections // workers),
        max_connections_per_ip=-(-config.server.max_connections_per_ip // workers),
        trusted=tuple(ipaddress.ip_network(n, strict=False) for n in config.smtp.trusted_networks),
    )


class Connections:
    """Counts open connections, globally and per client address, and keeps their sockets."""

    def __init__(self):
        self._lock = threading.Lock()
        self._per_ip: dict[str, int] = {}
        self._open: dict[int, socket.socket] = {}
        self._serial = 0
        self.idle = threading.Condition(self._lock)

    def admit(self, ip: str, sock: socket.socket, limits: Limits) -> tuple[int, replies.Reply | None]:
        """Return (connection number, None) if admitted, else (0, the 421 to send)."""
        with self._lock:
            if len(self._open) >= limits.max_connections:
                return 0, replies.TOO_MANY_CONNECTIONS
            if self._per_ip.get(ip, 0) >= limits.max_connections_per_ip:
                return 0, replies.TOO_MANY_FROM_IP
            self._serial += 1
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            self._open[self._serial] = sock
            return self._serial, None

    def release(self, number: int, ip: str) -> None:
        with self._lock:
            self._open.pop(number, None)
            left = self._per_ip.get(ip, 1) - 1
            if left:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)
            if not self._open:
                self.idle.notify_all()

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self.idle.wait_for(lambda: not self._open, timeout)

    def interrupt_all(self) -> None:
        """Wake every session blocked in recv: it then says 421 and closes (shutdown)."""
        with self._lock:
            sockets = list(self._open.values())
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass


class SmtpServer:
    """Everything the listeners share: config-derived state, the queue, the connection table."""

    def __init__(
        self, config: Config, store: Store, log: EventLog, workers: int = 1,
        recipients: LocalRecipients | None = None, *, reuse_port: bool = False,
    ):
        self.store = store
        self.log = log
        # With several worker processes each listens on the same ports (SO_REUSEPORT, the
        # kernel spreads connections) and keeps an even share of the connection caps.
        # A supervisor's child always uses SO_REUSEPORT: the supervisor holds port 0's pick.
        self.workers = workers
        self.reuse_port = reuse_port or workers > 1
        self.connections = Connections()
        self.threads = SessionThreads()
        self.stopping = threading.Event()
        self.services = Services(new_id=store.new_id, intake_check=self._intake_check, log=log)
        self.listeners: dict[str, ListenerServer] = {}
        self.apply(config, recipients)

    def apply(self, config: Config, recipients: LocalRecipients | None = None) -> None:
        """Take a (re)loaded config: new connections use it; open ones keep what they had.

        recipients is the local recipient table built from the same config (the daemon reads
        local.recipients_file); None builds it here from the config alone.
        """
        if recipients is None:
            recipients = LocalRecipients.from_config(config)
        self.config = config
        self.recipients = recipients
        self.hostname = config.hostname  # resolved once: getfqdn() may ask DNS
        self.limits = limits_from(config, self.workers)
        self.settings = {
            lst.address: session_settings(config, lst, self.hostname, recipients) for lst in config.listeners
        }

    def _intake_check(self) -> str | None:
        try:
            return self.store.intake_check()
        except QueueError as exc:  # e.g. statvfs failed: refuse (452) rather than guess
            self.log("intake_error", level=logmod.WARNING, error=str(exc)[:120])
            return "error"

    # ---- listeners -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve the configured listeners (OSError if one cannot be bound)."""
        self.reload(self.config, self.recipients)

    def reload(self, config: Config, recipients: LocalRecipients | None = None) -> None:
        """Switch to config: bind its new listeners first, and only if all of them bind, take
        its settings and close the listeners it no longer names (OSError leaves all as it was)."""
        wanted = {lst.address: lst for lst in config.listeners}
        fresh: dict[str, ListenerServer] = {}
        try:
            for address, listener in wanted.items():
                if address not in self.listeners:
                    fresh[address] = ListenerServer(self, listener)
        except OSError:
            for server in fresh.values():
                server.server_close()
            raise
        self.apply(config, recipients)
        for address in list(self.listeners):
            if address not in wanted:
                self.listeners.pop(address).stop()
                self.log("listener_closed", address=address)
        for address, server in fresh.items():
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.5},
                name=f"listener-{address}", daemon=True,
            )
            thread.start()
            self.listeners[address] = server
            self.log("listening", address=address, role=server.listener.role, port=server.port)

    def stop(self, grace: float) -> None:
        """Stop accepting, give sessions `grace` seconds, then tell the rest 421 and close."""
        for server in self.listeners.values():
            server.stop()
        self.listeners.clear()
        if not self.connections.wait_idle(grace):
            self.stopping.set()
            self.connections.interrupt_all()
            self.connections.wait_idle(5.0)
        self.threads.close()

    # ---- one connection --------------------------------------------------------------------

    def handle(self, sock: socket.socket, peer: tuple, listener: Listener, number: int) -> None:
        limits = self.limits
        # A listener closed by a reload may still hand over a last connection.
        settings = self.settings.get(listener.address) or session_settings(
            self.config, listener, self.hostname
        )
        ip = peer[0]
        trusted = any(ipaddress.ip_address(ip) in net for net in limits.trusted)
        session = Session(settings, Client(ip, peer[1], trusted, number), self.services)
        started = time.monotonic()
        self.log("connect", ip=ip, port=peer[1], listener=listener.address, conn=number)
        conn = _Conn(sock)
        try:
            if limits.greet_pause and conn.readable(limits.greet_pause):
                conn.send(session.input_before_reply())
                return
            conn.send([session.greeting()])
            self._converse(conn, session, limits)
        except OSError as exc:
            self.log("io_error", ip=ip, conn=number, error=str(exc)[:80])
        except Exception:
            # A bug costs one session, never the server.  For the client it is a transient
            # failure (451), never a permanent one, and no exception text reaches it; the
            # traceback goes to the log.
            self.log.exception("internal_error", ip=ip, conn=number)
            with contextlib.suppress(OSError):
                conn.send([replies.INTERNAL_ERROR])
        finally:
            self.log(
                "disconnect", ip=ip, conn=number, commands=session.commands_seen,
                errors=session.errors, seconds=round(time.monotonic() - started, 3),
            )

    def _converse(self, conn: _Conn, session: Session, limits: Limits) -> None:
        timeout = None
        conn.set_timeout(socket.SO_SNDTIMEO, limits.command_timeout)
        while session.state != CLOSED:
            wanted = limits.data_timeout if session.in_data else limits.command_timeout
            if wanted != timeout:
                conn.set_timeout(socket.SO_RCVTIMEO, wanted)
                timeout = wanted
            try:
                data = conn.sock.recv(RECV_SIZE)
            except BlockingIOError:  # SO_RCVTIMEO expired
                conn.send(session.timed_out())
                return
            if not data:
                if self.stopping.is_set():
                    conn.send(session.shutting_down())
                return
            outputs = session.feed(data)
            pending: list = []
            while outputs:
                item = outputs.pop(0)
                if isinstance(item, Enqueue):
                    outputs = self._enqueue(session, item) + outputs
                else:
                    pending.append(item)
            if session.awaiting_data and conn.readable(0):
                # RFC 2920 §3.1: the client sent message text before our 354.
                pending[-1:] = session.input_before_reply()
            conn.send(pending)

    def _enqueue(self, session: Session, item: Enqueue) -> list:
        try:
            self.store.enqueue(item.message)
        except QueueError as exc:
            return session.enqueue_failed(exc)
        return session.enqueued(item.message)


class _Conn:
    """A blocking client socket whose timeouts the kernel keeps (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's own socket timeouts poll() before every recv and send; kernel timeouts halve
    the system calls of a conversation, which is most of what a session costs.
    """

    __slots__ = ("sock",)
    _TIMEVAL = struct.Struct("@ll")

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def set_timeout(self, option: int, seconds: float) -> None:
        whole = int(seconds)
        value = self._TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, option, value)

    def send(self, items: list) -> None:
        if items:
            self.sock.sendall(b"".join(r.to_bytes() for r in items))

    def readable(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)


class ListenerServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # accept backlog: bursts of clients wait in the kernel

    def __init__(self, owner: SmtpServer, listener: Listener):
        self.owner = owner
        self.listener = listener
        host, port = split_host_port(listener.address)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.allow_reuse_port = owner.reuse_port
        # process_request below runs each connection itself, so no handler class is used.
        super().__init__((host, port), socketserver.BaseRequestHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Separate IPv4 and IPv6 listeners may share a port.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def process_request(self, request, client_address) -> None:
        """A thread per connection (a reused one), after the connection caps are checked."""
        number, refusal = self.owner.connections.admit(client_address[0], request, self.owner.limits)
        if refusal is not None:
            # Refused in the accept thread: no session thread for a client we won't serve.
            self.owner.log("reject", ip=client_address[0], reason="connection_limit", reply="421 4.7.0")
            try:
                request.settimeout(1.0)
                request.sendall(refusal.format(host=self.owner.hostname).to_bytes())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.owner.threads.submit(self._serve, request, client_address, number)

    def _serve(self, request, client_address, number) -> None:
        try:
            self.owner.handle(request, client_address, self.listener, number)
        finally:
            self.owner.connections.release(number, client_address[0])
            self.shutdown_request(request)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
