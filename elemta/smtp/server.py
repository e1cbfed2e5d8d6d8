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
import ssl
import threading
import time
from collections.abc import Callable

from elemta import log as logmod
from elemta import metrics
from elemta.config import SUBMISSION_ROLES, TLS_ROLES, Config, Listener, split_host_port
from elemta.errors import QueueError
from elemta.local import LocalRecipients
from elemta.log import EventLog
from elemta.passwords import PasswordFile
from elemta.plugins.api import SMTP_HOOKS
from elemta.queue.store import Store
from elemta.shm import Counts, Region, RegionFull
from elemta.smtp import proxy, replies
from elemta.smtp.connections import Connections, Limits, Watch
from elemta.smtp.limits import Limiter
from elemta.smtp.limits import size_for as limits_size_for
from elemta.smtp.loop import LoopListener
from elemta.smtp.replies import Reply
from elemta.smtp.session import (
    Client,
    Close,
    Enqueue,
    Output,
    Services,
    Session,
    Settings,
    StartTls,
)
from elemta.smtp.threads import SessionThreads
from elemta.smtp.tls import ServerTls, TlsInfo
from elemta.sockopts import set_kernel_timeout

RECV_SIZE = 65536
PROXY_TIMEOUT = 10.0  # seconds for a PROXY header to arrive
SWEEP_INTERVAL = 1.0  # seconds between deadline sweeps: a deadline is kept to within this
# Hooks that run in a session's own course: with a plugin that has one, sessions get a thread.
THREADED_HOOKS = (*SMTP_HOOKS, "on_enqueue", "on_disconnect")


def session_settings(
    config: Config, listener: Listener, hostname: str | None = None, recipients: LocalRecipients | None = None,
    tls_available: bool = False,
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
        starttls=tls_available and listener.role not in TLS_ROLES,
        auth_mechanisms=smtp.auth_mechanisms,
        auth_max_failures=smtp.auth_max_failures,
        sender_logins=smtp.sender_logins,
        authserv_id=smtp.authserv_id,
    )


def limits_from(config: Config) -> Limits:
    """The caps hold for all workers together: their counts are shared (smtp/connections.py)."""
    server = config.server
    max_connections = server.max_connections
    return Limits(
        command_timeout=config.smtp.command_timeout,
        data_timeout=config.smtp.data_timeout,
        greet_pause=config.smtp.greet_pause,
        max_connections=max_connections,
        max_connections_per_ip=server.max_connections_per_ip,
        trusted=tuple(ipaddress.ip_network(n, strict=False) for n in config.smtp.trusted_networks),
        proxies=tuple(ipaddress.ip_network(n, strict=False) for n in server.proxy_networks),
        # At most half the slots are kept back, so a small max_connections still serves port 25.
        reserved=min(server.reserved_connections, max_connections // 2),
        min_data_rate=config.smtp.min_data_rate,
        stress_timeout=config.smtp.stress_timeout,
        stress_at=max(1, max_connections * 3 // 4),
    )


class SmtpServer:
    """Everything the listeners share: config-derived state, the queue, the connection table."""

    def __init__(
        self, config: Config, store: Store, log: EventLog, workers: int = 1,
        recipients: LocalRecipients | None = None, *, reuse_port: bool = False, plugins=None,
        region: Region | None = None, connection_counts: Counts | None = None, worker: int = 0,
    ):
        """region and connection_counts: the memory the workers share (the supervisor makes
        them before it forks; None: private ones, for a process that runs alone); worker:
        this process's column in the counts."""
        self.store = store
        self.log = log
        # With several worker processes each listens on the same ports (SO_REUSEPORT, the
        # kernel spreads connections); the caps and [limits] count in the shared region.
        # A supervisor's child always uses SO_REUSEPORT: the supervisor holds port 0's pick.
        self.workers = workers
        self.plugins = plugins  # plugins.manager.Manager, started by the daemon; None = none
        self.reuse_port = reuse_port or workers > 1
        self.region = region if region is not None else Region(limits_size_for(config))
        self.connections = Connections(connection_counts, worker)
        self.threads = SessionThreads()
        self.stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._sweeper_stop = threading.Event()
        # ConfigError if a certificate cannot be loaded. The ticket keys come from the workers'
        # shared secret, so a session resumes on whichever worker the client reaches.
        self.tls = ServerTls(config.tls, log, ticket_secret=self.region.derive("tls session tickets"))
        self.services: Services | None = None
        self.limiter: Limiter | None = None
        self._limiter_key: tuple | None = None
        self.listeners: dict[str, ListenerServer | LoopListener] = {}
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
        self.limits = limits_from(config)
        # A reload keeps the counters (a SIGHUP must not lift a lockout or reset a flood's
        # count) unless what they count changed; the password file re-reads itself.
        limiter_key = (config.limits, config.smtp.auth_max_failures, config.smtp.auth_lockout)
        if self._limiter_key != limiter_key:
            self.limiter, self._limiter_key = self._new_limiter(config), limiter_key
        verifier = self.services.verifier if self.services else None
        if not config.smtp.auth_mechanisms:
            verifier = None
        elif not isinstance(verifier, PasswordFile) or verifier.path != config.smtp.auth_file:
            verifier = PasswordFile(config.smtp.auth_file)
        self.services = Services(
            new_id=self.store.new_id, intake_check=self._intake_check, log=self.log,
            verifier=verifier, guard=self.limiter, plugins=self.plugins,
        )
        self.settings = {
            lst.address: session_settings(config, lst, self.hostname, recipients, self.tls.available)
            for lst in config.listeners
        }
        # Which listeners' sessions must have a thread of their own rather than a place in the
        # loop (smtp/loop.py): what they run may block, plugins' hooks asking DNS or AUTH's
        # password check on a submission port. Known here, once, not at every connection.
        plugins_block = self.plugins is not None and any(self.plugins.wants(h) for h in THREADED_HOOKS)
        self._threaded = {
            address: plugins_block or (settings.submission and verifier is not None)
            for address, settings in self.settings.items()
        }

    def _new_limiter(self, config: Config) -> Limiter | None:
        """Limiter over the shared tables; a reload whose limits.max_tracked needs tables the
        region has no room for keeps the old ones (the new size takes a restart)."""
        try:
            return Limiter(config, self.region)
        except RegionFull as exc:
            if self.limiter is None:
                raise
            self.log("reload_warning", level=logmod.WARNING, error=f"{exc}: limits.max_tracked changes need a restart")
            return self.limiter

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
        self._sweeper = threading.Thread(target=self._sweep, name="deadlines", daemon=True)
        self._sweeper.start()

    def _sweep(self) -> None:
        """Keep every session's deadline, and say when stress begins and ends."""
        while not self._sweeper_stop.wait(SWEEP_INTERVAL):
            try:
                _ended, stressed = self.connections.sweep(self.limits)
            except Exception:  # a bug here must not leave the deadlines unkept silently
                self.log.exception("internal_error", where="deadline_sweep")
                continue
            if stressed is not None:
                self.log("stress", level=logmod.WARNING if stressed else logmod.INFO,
                         state="on" if stressed else "off", connections=self.connections.total(),
                         max_connections=self.limits.max_connections)

    def reload(self, config: Config, recipients: LocalRecipients | None = None) -> None:
        """Switch to config: bind its new listeners first, and only if all of them bind, take
        its settings and close the listeners it no longer names (OSError leaves all as it was)."""
        wanted = {lst.address: lst for lst in config.listeners}
        fresh: dict[str, ListenerServer | LoopListener] = {}
        try:
            for address, listener in wanted.items():
                if address not in self.listeners:
                    fresh[address] = new_listener(self, listener)
        except OSError:
            for server in fresh.values():
                server.server_close()
            raise
        if self.listeners:
            # SIGHUP reloads the certificates too, changed names or not; a bad one is logged
            # and the one in use stays.
            self.tls.reload(config.tls)
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
        self._sweeper_stop.set()
        self.threads.close()

    # ---- one connection --------------------------------------------------------------------

    def admit(self, sock: socket.socket, peer: tuple, listener: Listener) -> tuple[int, Watch] | None:
        """Count a new connection against the caps and the connection rate: its number and
        Watch, or None when it was refused (told 421 here, in the accepting thread, so a client
        we won't serve gets no session; the caller closes it)."""
        ip, proxied = peer[0], listener.proxy_protocol
        # Behind a proxy the address here is the proxy's: the client's own cap, rate and
        # trust are checked once its PROXY header is read (SmtpServer._proxied).
        trusted = not proxied and self.limits.is_trusted(ip)
        number, watch, refusal = self.connections.admit(
            ip, sock, self.limits, per_ip=not proxied, privileged=trusted,
            reserved=proxied or trusted or listener.role in SUBMISSION_ROLES,
        )
        reason = "connection_limit"
        if refusal is None and not proxied and not trusted:
            assert self.limiter is not None  # configure() runs before the listeners start
            refusal = self.limiter.connect(ip)
            if refusal is not None:
                self.connections.release(number)
                reason = "connection_rate"
        if refusal is not None:
            metrics.CONNECTIONS.labels(listener.address, reason).inc()
            self.log("reject", ip=ip, reason=reason, reply="421 4.7.0")
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(refusal.format(host=self.hostname).to_bytes())
            return None
        assert watch is not None  # admitted
        metrics.CONNECTIONS.labels(listener.address, "accepted").inc()
        metrics.CONNECTIONS_OPEN.inc()
        return number, watch

    def release(self, number: int) -> None:
        """The end of an admitted connection (its socket closed by the caller)."""
        metrics.CONNECTIONS_OPEN.dec()
        self.connections.release(number)

    def handle(self, sock: socket.socket, peer: tuple, listener: Listener, number: int,
               watch: Watch | None = None) -> None:
        limits = self.limits
        if watch is None:  # called without the accept path (tests): deadlines kept all the same
            watch = Watch(sock, peer[0], False)
        conn = _Conn(sock)
        # Replies go out whole, in one send each: Nagle only delays them, and after a TLS 1.3
        # handshake it held the banner ~40 ms behind the session tickets' delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.set_timeout(socket.SO_RCVTIMEO, limits.command_timeout)
        conn.set_timeout(socket.SO_SNDTIMEO, limits.command_timeout)
        ip, early = peer[0], b""
        if listener.proxy_protocol:
            peer, early = self._proxied(conn, peer, number, limits, listener, watch)
            if peer is None:
                return
        started = time.monotonic()
        session = self.new_session(listener, peer, number, proxy=ip if listener.proxy_protocol else None)
        self._run(conn, session, started, lambda: self._open(conn, session, listener, limits, watch, early))

    def new_session(self, listener: Listener, peer: tuple, number: int, proxy: str | None = None) -> Session:
        """A session for a new connection, logged; under the settings of now (a reload's for a
        listener it closed)."""
        settings = self.settings.get(listener.address) or session_settings(self.config, listener, self.hostname)
        assert self.services is not None  # configure() runs before the listeners start
        session = Session(settings, Client(peer[0], peer[1], self.limits.is_trusted(peer[0]), number), self.services)
        if proxy:
            self.log("connect", ip=peer[0], port=peer[1], listener=listener.address, conn=number, proxy=proxy)
        else:
            self.log("connect", ip=peer[0], port=peer[1], listener=listener.address, conn=number)
        return session

    def needs_thread(self, listener: Listener) -> bool:
        """Whether a new session on listener must have a thread of its own (apply() says which);
        a listener a reload has closed gives its last connections one too."""
        return self._threaded.get(listener.address, True)

    def serve(self, sock: socket.socket, peer: tuple, listener: Listener, number: int, watch: Watch) -> None:
        """A session in this thread (a session thread's job), to its end and the connection's."""
        try:
            self.handle(sock, peer, listener, number, watch)
        finally:
            self.release(number)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            sock.close()

    def _run(self, conn: _Conn, session: Session, started: float, body: Callable[[], None]) -> None:
        """Run a session's conversation (body) to its end, whatever ends it."""
        sock, number = conn.sock, session.client.conn
        try:
            body()
        except OSError as exc:
            self.log("io_error", ip=session.client.ip, conn=number, error=str(exc)[:80])
        except Exception:
            # A bug costs one session, never the server.  For the client it is a transient
            # failure (451), never a permanent one, and no exception text reaches it; the
            # traceback goes to the log.
            self.log.exception("internal_error", ip=session.client.ip, conn=number)
            with contextlib.suppress(OSError):
                conn.send([replies.INTERNAL_ERROR])
        finally:
            session.disconnected()
            if conn.sock is not sock:
                with contextlib.suppress(OSError):
                    conn.sock.close()
            self.log(
                "disconnect", ip=session.client.ip, conn=number, commands=session.commands_seen,
                errors=session.errors, seconds=round(time.monotonic() - started, 3),
            )

    def _open(self, conn: _Conn, session: Session, listener: Listener, limits: Limits, watch: Watch,
              early: bytes) -> None:
        """From the connection to the conversation: TLS on port 465, greet_pause, the greeting."""
        if listener.role in TLS_ROLES:  # RFC 8314 §3.3: TLS from the first byte
            if not self._start_tls(conn, session, session.client.conn, limits.command_timeout):
                return
        elif limits.greet_pause and not early and conn.readable(limits.greet_pause):
            conn.send(session.input_before_reply())
            return
        greeting = session.greeting()
        conn.send(greeting)
        if isinstance(greeting[-1], Close):  # a plugin's on_connect said 421
            return
        watch.asked(False)
        self._converse(conn, session, limits, watch, early)

    def _proxied(self, conn: _Conn, peer: tuple, number: int, limits: Limits, listener: Listener,
                 watch: Watch) -> tuple:
        """Read the PROXY header: ((client ip, port), bytes after it), or (None, b"") when the
        connection must go (not from a proxy we trust, a bad header, or over a limit)."""
        ip = peer[0]
        if not any(ipaddress.ip_address(ip) in net for net in limits.proxies):
            self.log("reject", ip=ip, conn=number, reason="proxy_not_trusted")
            return None, b""
        buffer = b""
        # The spec (§2) asks a receiver to wait at least 3 s; a proxy that sends nothing
        # must not hold a session thread for the whole command timeout.
        conn.set_timeout(socket.SO_RCVTIMEO, min(PROXY_TIMEOUT, limits.command_timeout))
        try:
            while (parsed := proxy.parse(buffer)) is None:
                if len(buffer) >= proxy.MAX_HEADER:
                    raise proxy.ProxyError("header too long")
                data = conn.sock.recv(proxy.MAX_HEADER - len(buffer))
                if not data:
                    raise proxy.ProxyError("connection closed before the header")
                buffer += data
        except (proxy.ProxyError, BlockingIOError, OSError) as exc:
            self.log("reject", ip=ip, conn=number, reason="proxy_header", error=str(exc)[:80] or "timeout")
            return None, b""
        header, used = parsed
        conn.set_timeout(socket.SO_RCVTIMEO, limits.command_timeout)
        client = header.source or peer  # LOCAL (a health check) or UNKNOWN: the proxy itself
        mapped = getattr(ipaddress.ip_address(client[0]), "ipv4_mapped", None)
        if mapped is not None:  # ::ffff:192.0.2.1 is 192.0.2.1, for trust, limits and logs
            client = (str(mapped), client[1])
        trusted = limits.is_trusted(client[0])
        watch.privileged = trusted
        reserved = trusted or listener.role in SUBMISSION_ROLES
        refusal = self.connections.rekey(number, client[0], limits, reserved=reserved)
        reason = "connection_limit"
        if refusal is None and not trusted:
            assert self.limiter is not None  # configure() runs before the listeners start
            refusal, reason = self.limiter.connect(client[0]), "connection_rate"
        if refusal is not None:
            metrics.CONNECTIONS.labels(listener.address, reason).inc()
            self.log("reject", ip=client[0], conn=number, reason=reason, proxy=ip,
                     reply=f"{refusal.code} {refusal.enhanced}")
            with contextlib.suppress(OSError):
                conn.send([refusal.format(host=self.hostname)])
            return None, b""
        return client, buffer[used:]

    def _start_tls(self, conn: _Conn, session: Session, number: int, timeout: float) -> bool:
        """Handshake on conn (after STARTTLS's 220, or at once on implicit TLS)."""
        self.tls.check()  # cheap: at most one stat per tls.reload_interval
        try:
            conn.sock.settimeout(timeout)  # Python's timeout from here on: see _Conn
            conn.sock = self.tls.context().wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False
            )
            self.connections.replace(number, conn.sock)
            conn.sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:  # TimeoutError: the client said nothing
            reason = getattr(exc, "reason", None) or str(exc)[:80] or type(exc).__name__
            self.log("tls_failed", ip=session.client.ip, conn=number, error=reason)
            metrics.TLS_HANDSHAKES.labels("in", "none", "failed").inc()
            return False
        info = TlsInfo.of(conn.sock)
        metrics.TLS_HANDSHAKES.labels("in", conn.sock.version() or "unknown", "ok").inc()
        session.tls_started(info)
        return True

    def _converse(self, conn: _Conn, session: Session, limits: Limits, watch: Watch,
                  early: bytes = b"") -> None:
        timeout = limits.command_timeout  # as handle() set it
        while True:
            wanted = limits.data_timeout if session.in_data else limits.command_timeout
            if wanted != timeout:
                conn.set_timeout(socket.SO_RCVTIMEO, wanted)
                timeout = wanted
            if early:  # what came behind a PROXY header, before our greeting
                data, early = early, b""
            else:
                watch.waiting = True
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO (TLS: Python's timeout) expired
                    self._timed_out(conn, session, "silence")
                    return
                watch.waiting = False
            if not data:
                if watch.expired:  # the sweeper ended the wait: the whole request took too long
                    self._timed_out(conn, session, "stress" if self.connections.stressed else "deadline")
                elif self.stopping.is_set():
                    conn.send(session.shutting_down())
                return
            outputs = session.feed(data)
            pending: list[Output] = []  # replies to send in one write, and a Close after the last
            while outputs:
                item = outputs.pop(0)
                if isinstance(item, Enqueue):
                    outputs = self._enqueue(session, item) + outputs
                elif isinstance(item, StartTls):
                    conn.send(pending)  # the 220, in the clear
                    pending = []
                    if not self._start_tls(conn, session, session.client.conn, timeout):
                        return
                else:
                    pending.append(item)
            if session.awaiting_data and conn.readable(0):
                # RFC 2920 §3.1: the client sent message text before our 354.
                pending[-1:] = session.input_before_reply()
            conn.send(pending)
            if pending and isinstance(pending[-1], Close):  # nothing ever follows a Close
                return
            if pending:  # a request was answered: the client's time for the next one starts
                watch.asked(session.in_data)
                if session.user is not None:
                    watch.privileged = True
            elif session.in_data:
                watch.data_bytes += len(data)

    def _timed_out(self, conn: _Conn, session: Session, why: str) -> None:
        self.log("timeout", ip=session.client.ip, conn=session.client.conn,
                 phase="data" if session.in_data else "command", limit=why)
        conn.send(session.timed_out())

    def _enqueue(self, session: Session, item: Enqueue) -> list:
        listener = session.settings.listener
        try:
            self.store.enqueue(item.message)
        except QueueError as exc:
            metrics.MESSAGES.labels(listener, "failed").inc()
            return session.enqueue_failed(exc)
        metrics.MESSAGES.labels(listener, "accepted").inc()
        metrics.RECEIVED_BYTES.inc(len(item.message.body))
        return session.enqueued(item.message)


class _Conn:
    """A blocking client socket whose timeouts the kernel keeps (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's own socket timeouts poll() before every recv and send; kernel timeouts halve
    the system calls of a conversation, which is most of what a session costs.

    Not over TLS: when the kernel's timeout ends a read on a blocking SSLSocket, OpenSSL
    says SSL_ERROR_WANT_READ and Python's ssl module simply reads again, so a client that
    went silent after STARTTLS (or never began the handshake on port 465) held its session
    thread for good. TLS sockets therefore use Python's timeout (TimeoutError).
    """

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def set_timeout(self, option: int, seconds: float) -> None:
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(seconds)  # one timeout for both directions
            return
        set_kernel_timeout(self.sock, option, seconds)

    def send(self, items: list[Output]) -> None:
        """Send the replies among a session's outputs, in one write.  The other outputs are the
        caller's to act on (a Close ends the conversation after this send)."""
        data = b"".join(item.to_bytes() for item in items if isinstance(item, Reply))
        if data:
            self.sock.sendall(data)

    def readable(self, timeout: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True  # decrypted bytes already read from the kernel
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
        admitted = self.owner.admit(request, client_address, self.listener)
        if admitted is None:
            self.shutdown_request(request)
            return
        self.owner.threads.submit(self.owner.serve, request, client_address, self.listener, *admitted)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def new_listener(owner: SmtpServer, listener: Listener) -> ListenerServer | LoopListener:
    """A listener is served by an event loop (smtp/loop.py); one that reads a PROXY header
    first, by a thread per connection."""
    if listener.proxy_protocol:
        return ListenerServer(owner, listener)
    return LoopListener(owner, listener)
