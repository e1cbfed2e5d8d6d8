"""The SMTP server of one process: its listeners, the connection caps, limits and deadlines
they share, and the settings its sessions get (applied again at a reload).

A listener is served by an event loop (smtp/loop.py), or, when it reads a PROXY header first,
by a thread per connection (smtp/threaded.py), which also serves the sessions whose plugins
need a thread. Either way a message is stored through the queue when the session asks, and the
sessions are let finish (or told 421) when the daemon stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading

from elemta import log as logmod
from elemta import metrics
from elemta.config import SUBMISSION_ROLES, TLS_ROLES, Config, Listener
from elemta.errors import QueueError
from elemta.local import LocalRecipients
from elemta.log import EventLog
from elemta.passwords import PasswordFile
from elemta.plugins.api import SMTP_HOOKS
from elemta.queue.store import Store
from elemta.shm import Counts, Region, RegionFull
from elemta.smtp import threaded
from elemta.smtp.connections import Connections, Limits, Watch
from elemta.smtp.limits import Limiter
from elemta.smtp.limits import size_for as limits_size_for
from elemta.smtp.loop import LoopListener
from elemta.smtp.session import (
    Client,
    Services,
    Session,
    Settings,
)
from elemta.smtp.threaded import ListenerServer
from elemta.smtp.threads import SessionThreads
from elemta.smtp.tls import ServerTls

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
        threaded.serve(self, sock, peer, listener, number, watch)


def new_listener(owner: SmtpServer, listener: Listener) -> ListenerServer | LoopListener:
    """A listener is served by an event loop (smtp/loop.py); one that reads a PROXY header
    first, by a thread per connection."""
    if listener.proxy_protocol:
        return ListenerServer(owner, listener)
    return LoopListener(owner, listener)
