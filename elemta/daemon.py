"""The daemon: builds every component, passes it in, and handles signals.

SIGTERM/SIGINT: stop accepting, let sessions finish for server.grace_period seconds, tell the
rest 421, flush the queue writer, exit 0.  SIGHUP: reload the configuration; listeners are
opened and closed to match it and new connections get the new limits.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable

from elemta import config as cfgmod
from elemta import filemodes, metrics, monitor, sdnotify, shm
from elemta import log as logmod
from elemta.config import Config
from elemta.delivery import attempt, dane_dns, smtp_pool
from elemta.delivery.dns import Resolver
from elemta.delivery.mtasts_cache import PolicyCache
from elemta.delivery.mtasts_finder import PolicyFinder
from elemta.delivery.outcomes import Reporting
from elemta.delivery.router import Router
from elemta.delivery.scheduler import Scheduler
from elemta.delivery.tlsrpt_store import Reports
from elemta.errors import ConfigError, ElemtaError, QueueError
from elemta.local import LocalRecipients
from elemta.pickup import Pickup
from elemta.plugins import api as plugin_api
from elemta.plugins import statsfile
from elemta.plugins.builtin.dkim import DkimPlugin
from elemta.plugins.manager import Manager
from elemta.queue import db, ids, integrity, schema
from elemta.queue.store import Store
from elemta.queue.work import WorkQueue
from elemta.ratelimit import SharedRateLimit
from elemta.smtp.connections import new_counts
from elemta.smtp.limits import size_for as limits_size_for
from elemta.smtp.server import SmtpServer
from elemta.smtp.tls import ServerTls
from elemta.wakeup import Wakeup, poke

# Smaller thread stacks: a thread per connection, and a session needs little stack.
THREAD_STACK = 512 * 1024


def build_store(config: Config, worker: int = 0) -> Store:
    q = config.queue
    return Store(
        config.queue_path,
        batch_max=q.batch_max,
        min_free_bytes=q.min_free_space,
        max_messages=q.max_messages,
        max_bytes=q.max_bytes,
        worker=worker,
    )


def prepare_spool(config: Config) -> str | None:
    """Check, create or upgrade the queue database before any child starts: one error for the
    operator (SpoolError) instead of one per child.  A queue that was there and is missing,
    empty or damaged is refused (queue/integrity.py).  Returns a warning when the integrity
    check did not finish in its time.  Leaves no connection or thread behind."""
    path = config.queue_path
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        integrity.check_presence(path)
        conn = db.connect(path)
        try:
            problems = integrity.quick_check(conn)
            if problems:
                raise integrity.DamagedQueue(
                    f"{path} fails SQLite's integrity check ({'; '.join(problems)[:300]}): see elemta(8), RECOVERY")
            schema.migrate(conn)
        finally:
            conn.close()
    except integrity.DamagedQueue as exc:
        raise SpoolError(f"server.spool_dir: {exc}") from None
    except (QueueError, OSError, sqlite3.Error) as exc:
        raise SpoolError(f"server.spool_dir: cannot open the queue {path}: {exc}") from None
    if problems is None:
        return (f"the integrity check of {path} did not finish in {integrity.START_CHECK_SECONDS:g} s; "
                f"check it with elemtactl queue check")
    return None


def open_log(config: Config) -> logmod.Target:
    """Where this process logs ([log] target); ConfigError naming the key if it cannot."""
    try:
        return logmod.open_target(config.log)
    except OSError as exc:
        to_file = config.log.target == "file"
        key, where = ("log.file", config.log.file) if to_file else ("log.target", logmod.SYSLOG_PATH)
        raise ConfigError(f"{key}: cannot log to {where}: {exc.strerror or exc}") from None


def build_resolver(config: Config) -> Resolver:
    try:
        return Resolver(config.delivery.resolvers, timeout=config.delivery.dns_timeout)
    except ValueError as exc:
        raise ConfigError(f"delivery.resolvers: {exc}") from None


def check_startup(config: Config) -> None:
    """What start-up reads beyond the config file itself (the recipient table, the relayhost's
    password file, the resolvers, the plugins and their options): ConfigError naming the key,
    so --check-config sees it too.  Each check runs even when one before it failed, and the
    ConfigError has all their problems: the operator fixes them in one pass."""
    problems: list[str] = []
    for check in (lambda: check_secrets(config),
                  lambda: ServerTls(config.tls),  # the certificates and their keys
                  lambda: Router(config, build_resolver(config), LocalRecipients.from_config(config)),
                  lambda: Manager(config.plugins)):
        try:
            check()
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(*problems)


def check_secrets(config: Config) -> None:
    """The AUTH password file, if there is one, must be private (ConfigError naming it); the
    TLS keys and the relayhost's password are checked where they are read."""
    if config.smtp.auth_mechanisms and os.path.lexists(config.smtp.auth_file):
        filemodes.check_secret(config.smtp.auth_file, "smtp.auth_file")


@dataclasses.dataclass(frozen=True)
class Shared:
    """The memory the SMTP workers share (shm.py): made once, before any fork, and kept by the
    supervisor, so a worker started again finds the counts as they are."""

    region: shm.Region
    connections: shm.Counts  # open connections, per worker, in all and per client address


# Room for the rate-limit plugin's rules (and a reload that resizes a table), on top of what
# the [limits] and the connection counts take; untouched pages cost no memory.
PLUGIN_TABLES_SIZE = 32 << 20


def new_shared(config: Config) -> Shared:
    capacity = max(config.server.max_connections, 1024)
    size = shm.Counts.size_for(capacity) + 2 * limits_size_for(config) + PLUGIN_TABLES_SIZE
    region = shm.Region(size)
    return Shared(region, new_counts(region, capacity))


def build_plugins(config: Config, events: logmod.EventLog, resolver: Resolver,
                  shared: Shared | None = None) -> Manager | None:
    """The configured plugins, started (ConfigError if one cannot start); None if there are none."""
    if not any(spec.enabled for spec in config.plugins):
        return None
    manager = Manager(config.plugins)
    manager.start(plugin_api.Services(
        hostname=config.hostname, spool_dir=config.server.spool_dir, dns=resolver, log=events,
        authserv_id=config.smtp.authserv_id or config.hostname, workers=config.server.worker_count,
        rate_limit=_shared_rate_limit(shared.region) if shared is not None else None,
    ))
    return manager


def _shared_rate_limit(region: shm.Region):
    """Services.rate_limit: a rate limit all SMTP workers count together."""
    def make(name: str, limit: float, window: float, *, max_keys: int = 100_000, now=time.monotonic):
        return SharedRateLimit(region, f"plugin.{name}", limit, window, max_keys=max_keys, now=now)
    return make


def report_signer(config: Config, plugins: Manager | None) -> Callable[[bytes], bytes] | None:
    """DKIM for the TLS reports elemta sends as postmaster@<hostname>: the first dkim plugin
    with a key for the hostname's domain or a parent of it; None without one."""
    for loaded in plugins.plugins if plugins is not None else ():
        signer = loaded.plugin
        if isinstance(signer, DkimPlugin) and signer.keyed_domain(config.hostname) is not None:
            return functools.partial(signer.signature_fields, domain=config.hostname)
    return None


def build_scheduler(config: Config, store: Store, events: logmod.EventLog,
                    recipients: LocalRecipients, plugins: Manager | None = None,
                    resolver: Resolver | None = None) -> Scheduler:
    """The delivery side, on the same queue database (ConfigError/QueueError if it cannot start)."""
    d = config.delivery
    resolver = resolver or build_resolver(config)
    router = Router(config, resolver, recipients)
    pool: smtp_pool.Pool = smtp_pool.Pool(idle_timeout=d.reuse_idle_timeout, max_messages=d.reuse_max_messages)
    sts = PolicyFinder(PolicyCache(config.server.spool_dir), resolver, ca_file=d.ca_file or None) if d.mta_sts else None
    dane, dane_off = None, "delivery.dane is off"
    if d.dane and dane_dns.trusted(d.resolvers):
        dane = dane_dns.TlsaLookup(d.resolvers, timeout=d.dns_timeout)
    elif d.dane:
        dane_off = "a resolver is not on this host: its AD bit cannot be trusted"
        events("dane_off", reason=dane_off)
    reports = None
    if d.tls_reports:
        reports = Reports(config.server.spool_dir, hostname=config.hostname, resolver=resolver,
                          enqueue=store.enqueue, new_id=store.new_id, log=events, ca_file=d.ca_file or None,
                          sign=report_signer(config, plugins))
    attempter = attempt.Attempter(
        attempt.Settings(helo_name=d.helo_name or config.hostname, connect_timeout=d.connect_timeout,
                         command_timeout=d.command_timeout, ca_file=d.ca_file or None),
        resolver, pool, sts=sts, dane=dane, dane_off=dane_off, tls_reports=reports,
    )
    work = WorkQueue(config.queue_path, owner=f"{socket.gethostname()}:{os.getpid()}", log=events)
    work.open()
    reporting = Reporting(config.hostname, store.new_id, d.double_bounce_to, events)
    return Scheduler(config, work, router, attempter, reporting, events, plugins=plugins)


# What one process runs: listeners and sessions ("smtp"), the delivery scheduler ("delivery"),
# or both ("all": a lone process, or worker 0 when server.delivery_process is off).
PROCESS_ROLES = ("all", "smtp", "delivery")
# The delivery process's number in queue IDs (its bounces); SMTP workers use 0..14.
DELIVERY_WORKER = ids.MAX_WORKER


class Daemon:
    def __init__(self, load_config: Callable[[], Config], announce=print, *, role: str = "all",
                 wake_pipe: tuple[int, int] | None = None, notifier: sdnotify.Notifier | None = None,
                 shared: Shared | None = None):
        """load_config reads the config (with command-line overrides) afresh on each call.

        wake_pipe (read end, write end) links SMTP processes to a delivery process: a byte
        written after each commit of new mail wakes the scheduler at once.
        """
        if role not in PROCESS_ROLES:
            raise ValueError(f"role must be one of {PROCESS_ROLES}")
        self.load_config = load_config
        self.announce = announce
        self.role = role
        self.wake_pipe = wake_pipe
        self.shared = shared  # a supervisor's children share its counters; else made at serve()
        self.notifier = notifier or sdnotify.Notifier({})  # a lone process talks to systemd
        self._wake = Wakeup()  # poked by the signal handlers: never a lock in a handler
        self._stop = False
        self._reload = False
        self._reopen = False
        self.scheduler: Scheduler | None = None
        self.pickup: Pickup | None = None
        self.plugins: Manager | None = None
        self.monitor: monitor.Monitor | None = None
        self.exit_now = False  # the caller should os._exit() after flushing: threads are stuck

    def run(self) -> int:
        return self.serve(self.load_config())

    def serve(self, config: Config, worker: int = 0, ready: Callable[[], None] | None = None) -> int:
        """Run one elemta process (its role's part) until SIGTERM.

        A child of a Supervisor passes its number (its queue IDs carry it) and `ready`,
        called once it listens; a lone process announces its listeners on stdout instead.
        """
        target = open_log(config)
        writer = logmod.BatchWriter(target)
        events = logmod.EventLog(config.log.level, config.log.format == "json", sink=writer, target=target)
        try:
            code = self._serve(config, worker, ready, events)
        finally:
            writer.close()
        if self.exit_now:
            sys.stdout.flush()
            os._exit(code)
        return code

    def _serve(self, config: Config, worker: int, ready, events: logmod.EventLog) -> int:
        threading.stack_size(THREAD_STACK)
        metrics.start()  # this process's counts reach the monitor (if metrics are on)
        delivers = self.role != "smtp"
        store = build_store(config, worker)
        try:
            # Leases belong to the process that delivers: only it takes them all back at start.
            store.open(recover_all=delivers)
        except (QueueError, OSError) as exc:
            raise SpoolError(f"server.spool_dir: cannot open the queue {config.queue_path}: {exc}") from None
        server = None
        try:
            check_secrets(config)
            recipients = LocalRecipients.from_config(config)
            resolver = build_resolver(config)  # one DNS cache for delivery and the plugins
            if self.shared is None:
                self.shared = new_shared(config)
            self.plugins = build_plugins(config, events, resolver, self.shared)
            if delivers:
                self.scheduler = build_scheduler(config, store, events, recipients, self.plugins, resolver)
            if self.role != "delivery":
                server = SmtpServer(config, store, events, workers=config.server.worker_count,
                                    recipients=recipients, reuse_port=ready is not None, plugins=self.plugins,
                                    region=self.shared.region, connection_counts=self.shared.connections,
                                    worker=worker)
                try:
                    server.start()
                except OSError as exc:
                    raise ConfigError(f"listeners: cannot listen: {exc}") from None
        except BaseException:
            if self.plugins is not None:
                self.plugins.stop()
            store.close()
            raise
        self._link(store)
        if self.scheduler is not None:
            self.scheduler.start()
            # The process that delivers also takes sendmail's files from the maildrop.
            self.pickup = Pickup(config.maildrop_path, store, config.hostname, config.smtp.max_message_size,
                                 events, hold=config.delivery.hold, on_enqueued=self._wake_scheduler)
            self.pickup.start()
        self._install_signals()
        if server is not None:
            try:  # /readyz: this process listens on all its listeners
                monitor.mark_listening(config, [lst.listener.address for lst in server.listeners.values()])
            except OSError as exc:
                events("status_failed", level=logmod.WARNING, error=str(exc)[:200])
        if ready is not None:
            ready()
        elif server is not None:
            for listener in server.listeners.values():
                self.announce(listening_line(str(listener.server_address[0]), listener.port,
                                             listener.listener.role))
            self._start_monitor(config, events)
        if server is not None:
            events("started", spool=config.server.spool_dir, listeners=len(server.listeners), worker=worker)
        else:
            events("delivery_started", spool=config.server.spool_dir, concurrency=config.delivery.concurrency)
        self.notifier.ready(_status(config))
        stats_path = statsfile.path_for(config.server.spool_dir, self.role, worker)
        stats_due = 0.0
        tick = min(1.0, self.notifier.watchdog_interval or 1.0)
        while True:
            # A timeout, so this thread runs the Python signal handlers even when the kernel
            # delivered the signal to another thread (which does not interrupt this wait).
            self.notifier.watchdog()
            self._wake.wait(tick)
            if self._stop:
                break
            if self._reopen or self._reload:  # logrotate moved the file away (SIGUSR1, SIGHUP)
                self._reopen = False
                self._reopen_log(events)
            if self._reload:
                self._reload = False
                self.notifier.reloading()
                config = self._do_reload(config, server, store, events)
                self.notifier.ready(_status(config))
            if server is not None:
                server.tls.check()  # certificate files changed on disk? (tls.reload_interval)
            if time.monotonic() >= stats_due:  # also with no plugins: elemtactl sees we run
                stats_due = time.monotonic() + statsfile.INTERVAL
                self._write_stats(stats_path, events)
        grace = config.server.grace_period
        self.notifier.stopping()
        if server is not None:
            events("stopping", grace=grace, open=server.connections.count())
            server.stop(grace)
        else:
            events("stopping", grace=grace)
        if self.pickup is not None:
            self.pickup.stop()
        if self.monitor is not None:
            self.monitor.stop()
        finished = self.scheduler is None or self._stop_scheduler(self.scheduler, grace, events)
        if self.plugins is not None:
            self.plugins.stop()
        statsfile.remove(stats_path)
        metrics.flush()
        if server is not None:
            monitor.clear_listening(config, os.getpid())
        store.close()
        events("stopped")
        if not finished:
            # Deliveries still talking to slow remotes: their recipients stay leased and are
            # recovered at the next start. Exit now rather than wait for their timeouts.
            self.exit_now = True
        return 0

    def _start_monitor(self, config: Config, events: logmod.EventLog) -> None:
        """A lone process serves [monitor] from a thread (a supervisor forks a process)."""
        if not config.monitor.listen:
            return
        started = time.time()
        bound: list[str] = []  # "host:port" each
        self.monitor = monitor.Monitor(
            config, lambda: monitor.process_status({}, started, config, bound), events)
        try:
            bound += [monitor.address_of(address) for address in self.monitor.start()]
        except OSError as exc:
            raise ConfigError(f"monitor.listen: cannot listen: {exc}") from None
        for address in bound:
            self.announce(monitor.announce_line(*monitor.split_host_port(address)))
        try:
            monitor.write_status(config, monitor.process_status({}, started, config, bound))
        except OSError as exc:
            events("status_failed", level=logmod.WARNING, error=str(exc)[:200])

    def _link(self, store: Store) -> None:
        """Wake the scheduler when new mail is committed: directly in one process, through the
        wake pipe between processes (a lost byte only delays mail until the next poll)."""
        if self.role == "all":
            store.on_commit = self._wake_scheduler
        elif self.wake_pipe is None:
            return
        elif self.role == "smtp":
            store.on_commit = lambda fd=self.wake_pipe[1]: poke(fd)
        else:
            threading.Thread(target=self._woken_by, args=(self.wake_pipe[0],),
                             name="wake-pipe", daemon=True).start()

    def _wake_scheduler(self) -> None:
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.wake()

    def _woken_by(self, fd: int) -> None:
        while os.read(fd, 4096):
            scheduler = self.scheduler
            if scheduler is not None:
                scheduler.wake()

    @staticmethod
    def _stop_scheduler(scheduler: Scheduler, grace: float, events: logmod.EventLog,
                        successor: Scheduler | None = None) -> bool:
        """Stop a scheduler; at a reload, the results it could not write yet go to its successor."""
        finished = scheduler.stop(grace)
        scheduler.work.close(successor.work if successor is not None else None)
        if not finished:
            events("deliveries_abandoned", level=logmod.WARNING,
                   note="still running at the end of the grace period; retried after restart")
        return finished

    def _write_stats(self, path, events: logmod.EventLog) -> None:
        try:
            statsfile.write(path, self.plugins.stats() if self.plugins is not None else [])
        except OSError as exc:
            events("plugin_stats_failed", level=logmod.WARNING, error=str(exc)[:200])

    def _reload_plugins(self, old: Config, config: Config, server: SmtpServer | None,
                        events: logmod.EventLog) -> None:
        """New plugins when their settings changed: built and started before the old ones stop
        (ConfigError from a bad one leaves the old ones in place, and the reload fails)."""
        if (old.plugins, old.smtp.authserv_id) == (config.plugins, config.smtp.authserv_id):
            return
        fresh = build_plugins(config, events, build_resolver(config), self.shared)
        stale, self.plugins = self.plugins, fresh
        if server is not None:
            server.plugins = fresh
        if self.scheduler is not None:
            self.scheduler.plugins = fresh
        if stale is not None:
            stale.stop()  # sessions still using them see fail-open or fail-closed results

    def _do_reload(self, old: Config, server: SmtpServer | None, store: Store,
                   events: logmod.EventLog) -> Config:
        """All or nothing: a config that is invalid or whose listeners cannot bind changes nothing.

        Returns the config in force from now on.
        """
        try:
            config = self.load_config()
            check_secrets(config)
            recipients = LocalRecipients.from_config(config)
        except ConfigError as exc:
            events("reload_failed", level=logmod.WARNING, error=str(exc))
            return old
        old_spool = old.server.spool_dir
        if config.server.spool_dir != old_spool:
            events("reload_warning", level=logmod.WARNING, error="server.spool_dir changes need a restart")
            config = cfgmod.replace(config, server={"spool_dir": old_spool})
        try:
            self._reload_plugins(old, config, server, events)
        except ConfigError as exc:
            events("reload_failed", level=logmod.WARNING, error=str(exc))
            return old
        if server is not None:
            try:
                server.reload(config, recipients)
            except OSError as exc:
                events("reload_failed", level=logmod.WARNING, error=f"cannot listen: {exc}")
                return old
        if self.scheduler is not None:
            self._reload_delivery(old, config, store, events, recipients)
        if self.pickup is not None:
            self.pickup.hostname = config.hostname
            self.pickup.max_size = config.smtp.max_message_size
            self.pickup.hold = config.delivery.hold
        store.set_limits(
            min_free_bytes=config.queue.min_free_space,
            max_messages=config.queue.max_messages,
            max_bytes=config.queue.max_bytes,
            batch_max=config.queue.batch_max,
        )
        events.configure(config.log.level, config.log.format == "json")
        events("reloaded", listeners=len(server.listeners) if server is not None else 0)
        return config

    def _reload_delivery(self, old: Config, config: Config, store: Store, events: logmod.EventLog,
                         recipients: LocalRecipients) -> None:
        """A new scheduler when delivery settings changed; else only the new recipient table
        (local.recipients_file may have new contents)."""
        scheduler = self.scheduler
        assert scheduler is not None  # only a process that delivers reloads delivery
        if (old.delivery, old.local, old.smtp.local_domains) == (
            config.delivery, config.local, config.smtp.local_domains
        ):
            scheduler.router.recipients = recipients
            return
        try:
            fresh = build_scheduler(config, store, events, recipients, self.plugins)
        except (ConfigError, QueueError) as exc:
            events("reload_warning", level=logmod.WARNING, error=f"delivery keeps its old settings: {exc}")
            return
        self._stop_scheduler(scheduler, old.server.grace_period, events, successor=fresh)
        self.scheduler = fresh
        fresh.start()

    @staticmethod
    def _reopen_log(events: logmod.EventLog) -> None:
        try:
            events.target.reopen()
        except OSError as exc:  # keep writing where we were: better than nowhere
            events("log_reopen_failed", level=logmod.WARNING, error=str(exc)[:200])

    def _install_signals(self) -> None:
        def stop(signum, frame):
            self._stop = True
            self._wake.poke()

        def reload(signum, frame):
            self._reload = True
            self._wake.poke()

        def reopen(signum, frame):
            self._reopen = True
            self._wake.poke()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)
        signal.signal(signal.SIGUSR1, reopen)


def _status(config: Config) -> str:
    ports = ", ".join(str(listener.port) for listener in config.listeners)
    return f"one process: SMTP on port(s) {ports} and delivery"


def listening_line(host: str, port: int, role: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"elemta: listening on {shown}:{port} ({role})"


class SpoolError(ElemtaError):
    """The spool or its queue database cannot be opened."""


def exit_code(exc: BaseException) -> int | None:
    """The sysexits.h status for an error that is the operator's to fix, else None."""
    if isinstance(exc, ConfigError):
        return 78  # EX_CONFIG
    if isinstance(exc, SpoolError):
        return 73  # EX_CANTCREAT
    return None
