"""The daemon: builds every component, passes it in, and handles signals.

SIGTERM/SIGINT: stop accepting, let sessions finish for server.grace_period seconds, tell the
rest 421, flush the queue writer, exit 0.  SIGHUP: reload the configuration; listeners are
opened and closed to match it and new connections get the new limits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from elemta import config as cfgmod
from elemta import log as logmod
from elemta import metrics, monitor, sdnotify
from elemta.assemble import (
    Shared,
    SpoolError,
    build_plugins,
    build_resolver,
    build_scheduler,
    build_store,
    check_secrets,
    new_shared,
    open_log,
)
from elemta.config import Config
from elemta.delivery.scheduler import Scheduler
from elemta.errors import ConfigError, QueueError
from elemta.local import LocalRecipients
from elemta.pickup import Pickup
from elemta.plugins import statsfile
from elemta.plugins.manager import Manager
from elemta.queue import ids
from elemta.queue.store import Store
from elemta.smtp.server import SmtpServer
from elemta.wakeup import Wakeup, poke

# Smaller thread stacks: a thread per connection, and a session needs little stack.
THREAD_STACK = 512 * 1024


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
        elif self.scheduler is not None:
            self.scheduler.wake_on(self.wake_pipe[0])

    def _wake_scheduler(self) -> None:
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
        if self.wake_pipe is not None and self.role == "delivery":
            fresh.wake_on(self.wake_pipe[0])
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


def exit_code(exc: BaseException) -> int | None:
    """The sysexits.h status for an error that is the operator's to fix, else None."""
    if isinstance(exc, ConfigError):
        return 78  # EX_CONFIG
    if isinstance(exc, SpoolError):
        return 73  # EX_CANTCREAT
    return None
