"""A session in a thread of its own, on a blocking socket: for listeners that read a PROXY
header first (ListenerServer, a thread per connection) and for sessions whose plugins need a
thread (the loop hands them over, smtp/loop.py). `owner` is the SmtpServer (smtp/server.py):
its caps, limits, TLS, log and store.

Timeouts are the kernel's (SO_RCVTIMEO/SO_SNDTIMEO, see _Conn); the sweeper thread of the
owner ends a wait past its deadline by shutting the socket down.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import socketserver
import ssl
import time
from collections.abc import Callable

from elemta import metrics
from elemta.config import SUBMISSION_ROLES, TLS_ROLES, Listener, split_host_port
from elemta.errors import QueueError
from elemta.smtp import proxy, replies
from elemta.smtp.connections import Limits, Watch
from elemta.smtp.replies import Reply
from elemta.smtp.session import Close, Enqueue, Output, Session, StartTls
from elemta.smtp.tls import TlsInfo
from elemta.sockopts import set_kernel_timeout

RECV_SIZE = 65536
PROXY_TIMEOUT = 10.0  # seconds for a PROXY header to arrive


def handle(owner, sock: socket.socket, peer: tuple, listener: Listener, number: int,
           watch: Watch | None = None) -> None:
    """A connection's session, from the PROXY header (if any) to its end."""
    limits = owner.limits
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
        peer, early = _proxied(owner, conn, peer, number, limits, listener, watch)
        if peer is None:
            return
    started = time.monotonic()
    session = owner.new_session(listener, peer, number, proxy=ip if listener.proxy_protocol else None)
    _run(owner, conn, session, started, lambda: _open(owner, conn, session, listener, limits, watch, early))


def serve(owner, sock: socket.socket, peer: tuple, listener: Listener, number: int, watch: Watch) -> None:
    """A session in this thread (a session thread's job), to its end and the connection's."""
    try:
        handle(owner, sock, peer, listener, number, watch)
    finally:
        owner.release(number)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.close()


def _run(owner, conn: _Conn, session: Session, started: float, body: Callable[[], None]) -> None:
    """Run a session's conversation (body) to its end, whatever ends it."""
    sock, number = conn.sock, session.client.conn
    try:
        body()
    except OSError as exc:
        owner.log("io_error", ip=session.client.ip, conn=number, error=str(exc)[:80])
    except Exception:
        # A bug costs one session, never the server.  For the client it is a transient
        # failure (451), never a permanent one, and no exception text reaches it; the
        # traceback goes to the log.
        owner.log.exception("internal_error", ip=session.client.ip, conn=number)
        with contextlib.suppress(OSError):
            conn.send([replies.INTERNAL_ERROR])
    finally:
        session.disconnected()
        if conn.sock is not sock:
            with contextlib.suppress(OSError):
                conn.sock.close()
        owner.log(
            "disconnect", ip=session.client.ip, conn=number, commands=session.commands_seen,
            errors=session.errors, seconds=round(time.monotonic() - started, 3),
        )


def _open(owner, conn: _Conn, session: Session, listener: Listener, limits: Limits, watch: Watch,
          early: bytes) -> None:
    """From the connection to the conversation: TLS on port 465, greet_pause, the greeting."""
    if listener.role in TLS_ROLES:  # RFC 8314 §3.3: TLS from the first byte
        if not _start_tls(owner, conn, session, session.client.conn, limits.command_timeout):
            return
    elif limits.greet_pause and not early and conn.readable(limits.greet_pause):
        conn.send(session.input_before_reply())
        return
    greeting = session.greeting()
    conn.send(greeting)
    if isinstance(greeting[-1], Close):  # a plugin's on_connect said 421
        return
    watch.asked(False)
    _converse(owner, conn, session, limits, watch, early)


def _proxied(owner, conn: _Conn, peer: tuple, number: int, limits: Limits, listener: Listener,
             watch: Watch) -> tuple:
    """Read the PROXY header: ((client ip, port), bytes after it), or (None, b"") when the
    connection must go (not from a proxy we trust, a bad header, or over a limit)."""
    ip = peer[0]
    if not any(ipaddress.ip_address(ip) in net for net in limits.proxies):
        owner.log("reject", ip=ip, conn=number, reason="proxy_not_trusted")
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
        owner.log("reject", ip=ip, conn=number, reason="proxy_header", error=str(exc)[:80] or "timeout")
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
    refusal = owner.connections.rekey(number, client[0], limits, reserved=reserved)
    reason = "connection_limit"
    if refusal is None and not trusted:
        assert owner.limiter is not None  # configure() runs before the listeners start
        refusal, reason = owner.limiter.connect(client[0]), "connection_rate"
    if refusal is not None:
        metrics.CONNECTIONS.labels(listener.address, reason).inc()
        owner.log("reject", ip=client[0], conn=number, reason=reason, proxy=ip,
                 reply=f"{refusal.code} {refusal.enhanced}")
        with contextlib.suppress(OSError):
            conn.send([refusal.format(host=owner.hostname)])
        return None, b""
    return client, buffer[used:]


def _start_tls(owner, conn: _Conn, session: Session, number: int, timeout: float) -> bool:
    """Handshake on conn (after STARTTLS's 220, or at once on implicit TLS)."""
    owner.tls.check()  # cheap: at most one stat per tls.reload_interval
    try:
        conn.sock.settimeout(timeout)  # Python's timeout from here on: see _Conn
        tls_sock: ssl.SSLSocket = owner.tls.context().wrap_socket(
            conn.sock, server_side=True, do_handshake_on_connect=False
        )
        conn.sock = tls_sock
        owner.connections.replace(number, tls_sock)
        tls_sock.do_handshake()
    except (ssl.SSLError, OSError) as exc:  # TimeoutError: the client said nothing
        reason = getattr(exc, "reason", None) or str(exc)[:80] or type(exc).__name__
        owner.log("tls_failed", ip=session.client.ip, conn=number, error=reason)
        metrics.TLS_HANDSHAKES.labels("in", "none", "failed").inc()
        return False
    info = TlsInfo.of(tls_sock)
    metrics.TLS_HANDSHAKES.labels("in", tls_sock.version() or "unknown", "ok").inc()
    session.tls_started(info)
    return True


def _converse(owner, conn: _Conn, session: Session, limits: Limits, watch: Watch,
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
                _timed_out(owner, conn, session, "silence")
                return
            watch.waiting = False
        if not data:
            if watch.expired:  # the sweeper ended the wait: the whole request took too long
                _timed_out(owner, conn, session, "stress" if owner.connections.stressed else "deadline")
            elif owner.stopping.is_set():
                conn.send(session.shutting_down())
            return
        outputs = session.feed(data)
        pending: list[Output] = []  # replies to send in one write, and a Close after the last
        while outputs:
            item = outputs.pop(0)
            if isinstance(item, Enqueue):
                outputs = _enqueue(owner, session, item) + outputs
            elif isinstance(item, StartTls):
                conn.send(pending)  # the 220, in the clear
                pending = []
                if not _start_tls(owner, conn, session, session.client.conn, timeout):
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


def _timed_out(owner, conn: _Conn, session: Session, why: str) -> None:
    owner.log("timeout", ip=session.client.ip, conn=session.client.conn,
             phase="data" if session.in_data else "command", limit=why)
    conn.send(session.timed_out())


def _enqueue(owner, session: Session, item: Enqueue) -> list:
    listener = session.settings.listener
    try:
        owner.store.enqueue(item.message)
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

    def __init__(self, owner, listener: Listener):
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
