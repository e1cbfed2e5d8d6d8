"""A listener served by one event loop: every session of the listener in one thread.

A thread per connection costs a wake-up and a GIL hand-off for each read and each reply: on
this machine eleven context switches per relayed message in the SMTP worker, more than its
Python work. Here one thread waits on all the listener's sockets (one epoll, non-blocking),
feeds what arrives to each connection's sans-IO Session and writes its replies; TLS (STARTTLS,
port 465) is non-blocking too (ssl's SSLWantRead/SSLWantWrite, and pending() for what OpenSSL
has decrypted already); a message goes to the queue with Store.submit(), and the queue writer's
callback comes back through an eventfd, so the loop serves other clients while the group commit
runs.

The loop runs only what cannot block. A session whose plugins have hooks (they ask DNS) and
one on a submission listener with AUTH (a password check) get a thread of their own from the
connection on (smtp/threaded.py, the threaded path); listeners that read a PROXY header first
are not served by a loop at all (server.new_listener). greet_pause is a timer of the loop's.

Kept as on the threaded path: the caps and connection rate at accept (SmtpServer.admit), the
connection's Watch (the deadlines thread's shutdown(SHUT_RD) is end of input here), the
command and data timeouts (a sweep once a second; the command timeout holds for a TLS
handshake and for replies the client does not take), the store's 60 s wait for a commit,
the RFC 2920 check before a 354, the 421 at shutdown, and the same log lines and metrics.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import heapq
import os
import select
import socket
import ssl
import termios
import threading
import time

from elemta import log as logmod
from elemta import metrics
from elemta.config import TLS_ROLES, Listener, split_host_port
from elemta.errors import QueueError
from elemta.smtp import replies
from elemta.smtp.replies import Reply
from elemta.smtp.session import Close, Enqueue, StartTls
from elemta.smtp.tls import TlsInfo

RECV_SIZE = 65536
ACCEPT_BATCH = 64  # connections taken per readiness of the listening socket
SWEEP_INTERVAL = 1.0  # seconds between looks at the per-read timeouts
ENQUEUE_TIMEOUT = 60.0  # as Store.enqueue's: then the message is given up (451) if not yet taken
MAX_EARLY = 65536  # octets read while a commit is in flight before the loop stops reading
STOP_WAIT = 5.0  # seconds stop() waits for the loop to close the listening socket
# accept() failed (EMFILE, ENFILE, ENOBUFS): the pending connection stays ready, so trying
# again at once would spin; the loop serves its sessions and tries again after this pause.
ACCEPT_PAUSE = 0.1

_READ, _WRITE = select.EPOLLIN, select.EPOLLOUT
_NOT_READ, _NOT_WRITE = ~select.EPOLLIN, ~select.EPOLLOUT  # EPOLLERR, EPOLLHUP: the next read or write says
_NO_BYTES = bytes(4)  # FIONREAD's int, as ioctl() takes and gives it back


class _Conn:
    __slots__ = ("closing", "early", "greet_at", "handshaking", "held", "last", "limits", "mask", "number", "out",
                 "pending", "request", "session", "sock", "started", "starttls", "submitted", "tls", "watch")

    def __init__(self, sock, session, number, watch, limits, now):
        self.sock = sock
        self.session = session
        self.number = number
        self.watch = watch
        self.limits = limits
        self.out = bytearray()  # replies not yet written (the client is not reading)
        self.pending: list = []  # replies gathered while a commit is in flight, sent with its reply
        self.held: list = []  # outputs that came after an Enqueue, acted on after its outcome
        self.closing = False  # Close seen: close once `out` is written
        self.starttls = False  # STARTTLS's 220 given: the handshake begins once `out` is written
        self.handshaking = False  # TLS handshake under way
        self.tls = False  # the socket is an SSLSocket
        self.greet_at = 0.0  # smtp.greet_pause: when the greeting is due (0: given)
        self.request = None  # the store's request while a commit is in flight
        self.early = 0  # octets read while it is in flight
        self.submitted = 0.0
        self.mask = 0  # the selector events registered
        self.last = now  # the last input, reply or progress in sending one (per-read timeouts)
        self.started = now


class LoopListener:
    """A listening socket and the loop that serves it; what SmtpServer asks of a listener
    (port, listener, serve_forever, stop, server_close), as ListenerServer."""

    def __init__(self, owner, listener: Listener):
        self.owner = owner  # the SmtpServer
        self.listener = listener
        host, port = split_host_port(listener.address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if owner.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # separate IPv4 and IPv6 listeners may share a port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Replies go out whole (one send each): no Nagle delay. Set here, where Linux's
            # accepted sockets inherit it, instead of once per connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, port))
            sock.listen(1024)  # bursts of clients wait in the kernel
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.socket: socket.socket | None = sock
        self._listening_fd = sock.fileno()  # epoll reports descriptors
        self.server_address = sock.getsockname()
        # select.epoll itself, not selectors: its keys and maps per event and per change were 2%
        # of the instructions a message costs the loop (callgrind, 5 KB, one message per connection)
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}  # fd -> connection
        self.done: collections.deque = collections.deque()  # (conn, request) from the writer
        self._signalled = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closing = False
        self._closed = threading.Event()  # the listening socket is closed
        self._running = False
        self._paused_until = 0.0  # accepting paused after an error, until then
        self._greetings: list = []  # heap of (due, number, conn): greetings held by greet_pause
        self._error_logged = 0.0

    @property
    def port(self) -> int:
        return self.server_address[1]

    # ---- what SmtpServer calls ------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the loop until stop() and the end of the last connection it serves."""
        self._running = True
        epoll = self.epoll
        assert self.socket is not None  # serve_forever runs once, before stop()
        epoll.register(self.socket.fileno(), _READ)
        epoll.register(self._efd, _READ)
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            while self.socket is not None or self.conns:
                try:
                    next_sweep = self._turn(next_sweep)
                except Exception:  # a bug here must not end the listener: logged, and on
                    self.owner.log.exception("internal_error", where="smtp_loop")
                    time.sleep(0.1)  # were it to recur at once, a log line a turn would flood the log
        finally:
            self._close_listening()
            for conn in list(self.conns.values()):
                self._close(conn)
            epoll.close()
            os.close(self._efd)

    def _turn(self, next_sweep: float) -> float:
        """One wait for readiness and what follows it; returns when the next sweep is due."""
        wait = SWEEP_INTERVAL
        if self._paused_until:
            wait = max(0.0, min(wait, self._paused_until - time.monotonic()))
        if self._greetings:
            wait = max(0.0, min(wait, self._greetings[0][0] - time.monotonic()))
        events = self.epoll.poll(wait)  # (EINTR is retried by Python itself, PEP 475)
        # Each event's connection is looked up before any is served: serving one may close a
        # socket and accept another on the same descriptor, and that one's events are not these.
        conns, listening, efd = self.conns, self._listening_fd, self._efd
        for conn, fd, event in [(conns.get(fd), fd, event) for fd, event in events]:
            if conn is not None:
                mask = 0
                if event & _NOT_READ:
                    mask |= _WRITE
                if event & _NOT_WRITE:
                    mask |= _READ
                self._ready(conn, mask)
            elif fd == listening:
                self._accept()
            elif fd == efd:
                self._completions()
        now = time.monotonic()
        while self._greetings and self._greetings[0][0] <= now:
            self._greet(heapq.heappop(self._greetings)[2])
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            if self.socket is not None:
                self.epoll.register(self.socket.fileno(), _READ)
        if self._closing and self.socket is not None:
            if not self._paused_until:
                self.epoll.unregister(self.socket.fileno())
            self._close_listening()
        if now >= next_sweep:
            next_sweep = now + SWEEP_INTERVAL
            self._sweep(now)
        return next_sweep

    def stop(self) -> None:
        """Stop accepting (the port is closed when this returns); the open sessions go on to
        their end (SmtpServer.stop tells them 421 after the grace period)."""
        self._closing = True
        if not self._running:
            self._close_listening()
            return
        self._signal()
        self._closed.wait(STOP_WAIT)

    def server_close(self) -> None:
        if not self._running:
            self._close_listening()

    def _close_listening(self) -> None:
        sock, self.socket = self.socket, None
        if sock is not None:
            self._listening_fd = -1  # its number may come back as a client's
            sock.close()
        self._closed.set()

    # ---- accept ----------------------------------------------------------------------------

    def _accept(self) -> None:
        owner, listener, listening = self.owner, self.listener, self.socket
        assert listening is not None  # the selector has it only while it is open
        if self._closing:  # stop() came in the same turn: what waits in the backlog is reset
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: pause, log once a second
                now = time.monotonic()
                if now - self._error_logged >= 1.0:
                    self._error_logged = now
                    owner.log("accept_error", level=logmod.WARNING, error=str(exc)[:80])
                self.epoll.unregister(listening.fileno())
                self._paused_until = now + ACCEPT_PAUSE
                return
            admitted = owner.admit(sock, peer, listener)
            if admitted is None:
                sock.close()
                continue
            number, watch = admitted
            try:
                if owner.needs_thread(listener):
                    sock.setblocking(True)
                    owner.threads.submit(owner.serve, sock, peer, listener, number, watch)
                    continue
                self._open(sock, peer, number, watch)
            except Exception:  # a bug costs this connection, never the listener
                owner.log.exception("internal_error", ip=peer[0], conn=number)
                owner.release(number)
                sock.close()

    def _open(self, sock, peer, number, watch) -> None:
        owner = self.owner
        sock.setblocking(False)  # (TCP_NODELAY comes from the listening socket)
        session = owner.new_session(self.listener, peer, number)
        conn = _Conn(sock, session, number, watch, owner.limits, time.monotonic())
        self.conns[sock.fileno()] = conn
        try:
            if self.listener.role in TLS_ROLES:  # RFC 8314 §3.3: TLS from the first byte
                self._start_tls(conn)
                return
            self._want(conn, _READ)
            pause = conn.limits.greet_pause
            if pause:  # input before the greeting is refused (_readable); the greeting waits
                conn.greet_at = conn.started + pause
                heapq.heappush(self._greetings, (conn.greet_at, number, conn))
                return
            self._act(conn, session.greeting(), None)
        except Exception:
            self._internal_error(conn)

    def _greet(self, conn: _Conn) -> None:
        """greet_pause is over, and the client said nothing: the greeting."""
        if conn.sock is None or not conn.greet_at:
            return
        conn.greet_at = 0.0
        try:
            self._act(conn, conn.session.greeting(), None)
        except Exception:
            self._internal_error(conn)

    # ---- input -----------------------------------------------------------------------------

    def _ready(self, conn: _Conn, mask: int) -> None:
        try:
            if conn.handshaking:
                if conn.watch.expired:  # the deadlines thread shut the socket: the handshake took too long
                    self._tls_failed(conn, TimeoutError("timed out"))
                else:
                    self._handshake(conn)
                return
            if mask & _WRITE:
                self._flush(conn)
                if conn.handshaking:  # the 220 to STARTTLS is out: the handshake has begun
                    return
            if mask & _READ and conn.sock is not None and conn.mask & _READ:
                self._readable(conn)
        except Exception:  # a bug costs one session, never the loop
            self._internal_error(conn)

    def _readable(self, conn: _Conn) -> None:
        sock = conn.sock
        try:
            data = sock.recv(RECV_SIZE)
            # Decrypted bytes OpenSSL holds already are no readiness to select(): take them now.
            while conn.tls and data and sock.pending():
                data += sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return  # nothing yet (over TLS: no whole record yet)
        except ssl.SSLWantWriteError:
            return  # not with renegotiation off (tls.py); the next readiness tries again
        except OSError as exc:
            self.owner.log("io_error", ip=conn.session.client.ip, conn=conn.number, error=str(exc)[:80])
            self._close(conn)
            return
        session, watch = conn.session, conn.watch
        if not data:
            if conn.request is not None:  # the client left while its message is stored: wait for it
                self._want(conn, 0)
                conn.closing = True
            elif watch.expired:  # the deadlines thread ended the wait: the request took too long
                self._timed_out(conn, "stress" if self.owner.connections.stressed else "deadline")
            elif self.owner.stopping.is_set():
                self._act(conn, session.shutting_down(), None)
            else:
                self._close(conn)
            return
        conn.last = time.monotonic()
        if conn.greet_at:  # it talked before the greeting: not SMTP (typically a spam engine)
            conn.greet_at = 0.0
            self._act(conn, session.input_before_reply(), None)
            return
        if conn.request is not None:  # a commit is in flight: the session only buffers this
            session.feed(data)
            conn.early += len(data)
            if conn.early > MAX_EARLY:
                self._want(conn, conn.mask & ~_READ)
            return
        watch.waiting = False
        self._act(conn, session.feed(data), data)

    def _act(self, conn: _Conn, outputs: list, data: bytes | None) -> None:
        """Act on a session's outputs: the replies gathered and written in one send, an Enqueue
        submitted (what follows it waits for its outcome), STARTTLS's handshake begun once its
        220 is out (_flush), a Close after the last reply."""
        session, pending = conn.session, conn.pending
        if not pending and len(outputs) == 1 and type(outputs[0]) is Reply:
            pending = outputs  # nearly always: one command, one reply
        else:
            while outputs:
                item = outputs.pop(0)
                if isinstance(item, Enqueue):
                    conn.held = outputs
                    self._submit(conn, item)
                    return
                if isinstance(item, StartTls):
                    # The 220 goes out in the clear, then the handshake (_flush starts it); what
                    # follows waits for its end.
                    conn.starttls, conn.held = True, outputs
                    outputs = []
                    continue
                pending.append(item)
            conn.pending = []
        if session.awaiting_data and self._more_input(conn):
            # RFC 2920 §3.1: the client sent message text before our 354.
            pending[-1:] = session.input_before_reply()
        if pending and isinstance(pending[-1], Close):
            conn.closing = True
        if len(pending) == 1 and type(pending[0]) is Reply:
            text = pending[0].to_bytes()
        else:
            text = b"".join([item.to_bytes() for item in pending if isinstance(item, Reply)])
        watch = conn.watch
        if text:
            watch.asked(session.in_data)  # a request was answered: the client's time starts
            conn.last = time.monotonic()  # and the per-read timeout counts from here, as SO_RCVTIMEO
            if session.user is not None:
                watch.privileged = True
            conn.out += text
            self._flush(conn)
        elif data is not None and session.in_data:
            watch.data_bytes += len(data)
        elif conn.closing:
            self._close(conn)
        if conn.sock is not None:
            watch.waiting = True

    @staticmethod
    def _more_input(conn: _Conn) -> bool:
        sock = conn.sock
        if conn.tls:  # no MSG_PEEK through TLS: what OpenSSL holds, or bytes in the kernel
            return bool(sock.pending()) or bool(select.select([sock], [], [], 0)[0])
        try:  # FIONREAD: what the kernel holds, asked without raising BlockingIOError when nothing
            return fcntl.ioctl(sock.fileno(), termios.FIONREAD, _NO_BYTES) != _NO_BYTES
        except OSError:
            return True  # the read that follows says what happened

    # ---- output ----------------------------------------------------------------------------

    def _flush(self, conn: _Conn) -> None:
        if conn.sock is None:
            return
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0  # over TLS, the same bytes are offered again (OpenSSL asks it)
            except OSError as exc:
                self.owner.log("io_error", ip=conn.session.client.ip, conn=conn.number, error=str(exc)[:80])
                self._close(conn)
                return
            del conn.out[:sent]
            if sent:
                conn.last = time.monotonic()
        if conn.out:  # the client is not reading: no more input until it has our replies
            self._want(conn, _WRITE)
            return
        if conn.closing:
            self._close(conn)
            return
        if conn.starttls:
            self._start_tls(conn)
            return
        self._want(conn, 0 if conn.early > MAX_EARLY else _READ)

    def _want(self, conn: _Conn, mask: int) -> None:
        """Register the events conn waits for (0: none, out of the selector)."""
        if mask == conn.mask:
            return
        if not conn.mask:
            self.epoll.register(conn.sock.fileno(), mask)
        elif not mask:
            self.epoll.unregister(conn.sock.fileno())
        else:
            self.epoll.modify(conn.sock.fileno(), mask)
        conn.mask = mask

    # ---- TLS ---------------------------------------------------------------------------

    def _start_tls(self, conn: _Conn) -> None:
        """Wrap the socket (after STARTTLS's 220 is out, or at once on port 465) and begin
        the handshake; input is read again when it is done."""
        owner = self.owner
        conn.starttls = False
        owner.tls.check()  # cheap: at most one stat per tls.reload_interval
        self._want(conn, 0)  # the selector knows the plain socket object: out, then the new one in
        plain = conn.sock
        del self.conns[plain.fileno()]
        try:
            conn.sock = owner.tls.context().wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            conn.sock = plain
            self.conns[plain.fileno()] = conn
            self._tls_failed(conn, exc)
            return
        conn.tls = conn.handshaking = True
        self.conns[conn.sock.fileno()] = conn
        owner.connections.replace(conn.number, conn.sock)
        conn.last = time.monotonic()  # the client's time: the command timeout holds for the handshake
        conn.watch.waiting = True
        self._handshake(conn)

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, _READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, _WRITE)
            return
        except (ssl.SSLError, OSError) as exc:  # a client that is not speaking TLS, or left
            self._tls_failed(conn, exc)
            return
        conn.handshaking = False
        conn.last = time.monotonic()
        info = TlsInfo.of(conn.sock)
        metrics.TLS_HANDSHAKES.labels("in", conn.sock.version() or "unknown", "ok").inc()
        session = conn.session
        outputs = session.tls_started(info)
        if self.listener.role in TLS_ROLES:  # port 465 (no STARTTLS there): the greeting comes over TLS
            outputs += session.greeting()
            conn.watch.asked(False)
        held, conn.held = conn.held, []
        self._want(conn, _READ)
        self._act(conn, outputs + held, None)

    def _tls_failed(self, conn: _Conn, exc: Exception) -> None:
        reason = getattr(exc, "reason", None) or str(exc)[:80] or type(exc).__name__
        self.owner.log("tls_failed", ip=conn.session.client.ip, conn=conn.number, error=reason)
        metrics.TLS_HANDSHAKES.labels("in", "none", "failed").inc()
        self._close(conn)

    # ---- the queue -------------------------------------------------------------------------

    def _submit(self, conn: _Conn, item: Enqueue) -> None:
        conn.watch.waiting = False  # elemta's time, not the client's
        try:
            conn.request = self.owner.store.submit(item.message, lambda req, c=conn: self._stored(c, req))
        except QueueError as exc:
            self._outcome(conn, item.message, exc)
            return
        # Input that comes while the message is stored is only buffered by the session (it
        # waits for the outcome); past MAX_EARLY octets the loop stops reading until then.
        conn.early = 0
        conn.submitted = time.monotonic()

    def _stored(self, conn: _Conn, request) -> None:
        """In the writer thread: hand the outcome to the loop (one eventfd write per wake-up)."""
        self.done.append((conn, request))
        if not self._signalled:
            self._signalled = True
            self._signal()

    def _signal(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._efd, 1)

    def _completions(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        self._signalled = False
        done = self.done
        while done:
            conn, request = done.popleft()
            if conn.request is not request:  # given up (ENQUEUE_TIMEOUT) before the outcome came
                continue
            self._settled(conn, request.msg, request.error)

    def _settled(self, conn: _Conn, message, error) -> None:
        conn.request = None
        conn.early = 0
        if conn.sock is None:  # closed meanwhile (an error of the loop's own)
            return
        if conn.closing:  # the client left while its message was stored
            self._close(conn)
            return
        if not conn.mask & _READ:
            self._want(conn, conn.mask | _READ)
        try:
            self._outcome(conn, message, error)
        except Exception:
            self._internal_error(conn)

    def _outcome(self, conn: _Conn, message, error) -> None:
        listener = conn.session.settings.listener
        if error is not None:
            metrics.MESSAGES.labels(listener, "failed").inc()
            outputs = conn.session.enqueue_failed(error)
        else:
            metrics.MESSAGES.labels(listener, "accepted").inc()
            metrics.RECEIVED_BYTES.inc(len(message.body))
            outputs = conn.session.enqueued(message)
        held, conn.held = conn.held, []
        self._act(conn, outputs + held, None)

    # ---- ends ------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Per-read timeouts: no input for command_timeout (data_timeout in DATA); and a
        commit that did not come in ENQUEUE_TIMEOUT."""
        for conn in list(self.conns.values()):
            if conn.sock is None:
                continue
            try:
                self._overdue(conn, now)
            except Exception:
                self._internal_error(conn)

    def _overdue(self, conn: _Conn, now: float) -> None:
        if conn.out:  # replies the client does not take: ended as SO_SNDTIMEO ends a send
            if now - conn.last > conn.limits.command_timeout:
                self.owner.log("io_error", ip=conn.session.client.ip, conn=conn.number, error="send timed out")
                self._close(conn)
            return
        if conn.request is not None:
            if now - conn.submitted > ENQUEUE_TIMEOUT and conn.request.cancel():
                request = conn.request
                self._settled(conn, request.msg, QueueError(
                    f"timed out after {ENQUEUE_TIMEOUT:.0f}s waiting for the queue writer; message not stored"))
            return
        if conn.closing:
            return
        limits = conn.limits
        allowed = limits.data_timeout if conn.session.in_data else limits.command_timeout
        if now - conn.last <= allowed:
            return
        if conn.handshaking:  # as the threaded path: no 421 in the middle of a handshake
            self._tls_failed(conn, TimeoutError("timed out"))
        else:
            self._timed_out(conn, "silence")

    def _timed_out(self, conn: _Conn, why: str) -> None:
        session = conn.session
        self.owner.log("timeout", ip=session.client.ip, conn=conn.number,
                       phase="data" if session.in_data else "command", limit=why)
        conn.pending = []
        self._act(conn, session.timed_out(), None)

    def _internal_error(self, conn: _Conn) -> None:
        """A bug costs its session a 451 (never a 5xx) and the connection; the traceback goes
        to the log."""
        self.owner.log.exception("internal_error", ip=conn.session.client.ip, conn=conn.number)
        conn.pending, conn.held = [], []
        if conn.closing or conn.sock is None:
            self._close(conn)
            return
        conn.out += replies.INTERNAL_ERROR.to_bytes()
        conn.closing = True
        try:
            self._flush(conn)
        except Exception:  # noqa: BLE001 -- already failing: just close
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        sock = conn.sock
        if sock is None:
            return
        if conn.mask:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(sock.fileno())
            conn.mask = 0
        self.conns.pop(sock.fileno(), None)
        conn.sock = None
        sock.close()
        if conn.request is not None and conn.request.cancel():
            conn.request = None  # not taken by the writer: the message is not stored
        session, owner = conn.session, self.owner
        try:
            session.disconnected()
        except Exception:  # noqa: BLE001 -- logged; the connection ends all the same
            owner.log.exception("internal_error", ip=session.client.ip, conn=conn.number)
        owner.log("disconnect", ip=session.client.ip, conn=conn.number, commands=session.commands_seen,
                  errors=session.errors, seconds=round(time.monotonic() - conn.started, 3))
        owner.release(conn.number)
