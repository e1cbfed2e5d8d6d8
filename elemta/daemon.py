"""The daemon: builds every component, passes it in, and handles signals.

SIGTERM/SIGINT: stop accepting, let sessions finish for server.grace_period seconds, tell the
rest 421, flush the queue writer, exit 0.  SIGHUP: reload the configuration; listeners are
opened and closed to match it and new connections get the new limits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

from elemta import config as cfgmod
from elemta import log as logmod
from elemta.config import Config
from elemta.delivery import attempt, smtp_client
from elemta.delivery.dns import Resolver
from elemta.delivery.outcomes import Reporting
from elemta.delivery.router import Router
from elemta.delivery.scheduler import Scheduler
from elemta.errors import ConfigError, ElemtaError, QueueError
from elemta.local import LocalRecipients
from elemta.queue.store import Store
from elemta.queue.work import WorkQueue
from elemta.smtp.server import SmtpServer

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


def build_resolver(config: Config) -> Resolver:
    try:
        return Resolver(config.delivery.resolvers, timeout=config.delivery.dns_timeout)
    except ValueError as exc:
        raise ConfigError(f"delivery.resolvers: {exc}") from None


def check_startup(config: Config) -> None:
    """What start-up reads beyond the config file itself (the recipient table, the relayhost's
    password file, the resolvers): ConfigError naming the key, so --check-config sees it too."""
    Router(config, build_resolver(config), LocalRecipients.from_config(config))


def build_scheduler(config: Config, store: Store, events: logmod.EventLog,
                    recipients: LocalRecipients) -> Scheduler:
    """The delivery side, on the same queue database (ConfigError/QueueError if it cannot start)."""
    d = config.delivery
    resolver = build_resolver(config)
    router = Router(config, resolver, recipients)
    pool = smtp_client.Pool(idle_timeout=d.reuse_idle_timeout, max_messages=d.reuse_max_messages)
    attempter = attempt.Attempter(
        attempt.Settings(helo_name=d.helo_name or config.hostname, connect_timeout=d.connect_timeout,
                         command_timeout=d.command_timeout, ca_file=d.ca_file or None),
        resolver, pool,
    )
    work = WorkQueue(config.queue_path, owner=f"{socket.gethostname()}:{os.getpid()}",
                     on_error=lambda text: events("results_error", level=logmod.ERROR, error=text[:300]))
    work.open()
    reporting = Reporting(config.hostname, store.new_id, d.double_bounce_to, events)
    return Scheduler(config, work, router, attempter, reporting, events)


class Daemon:
    def __init__(self, load_config: Callable[[], Config], announce=print):
        """load_config reads the config (with command-line overrides) afresh on each call."""
        self.load_config = load_config
        self.announce = announce
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self.exit_now = False  # the caller should os._exit() after flushing: threads are stuck

    def run(self) -> int:
        return self.serve(self.load_config())

    def serve(self, config: Config, worker: int = 0, ready: Callable[[], None] | None = None) -> int:
        """Run one elemta process: listeners, sessions and a queue writer, until SIGTERM.

        A worker of a Supervisor passes its number (its queue IDs carry it) and `ready`,
        called once it listens; a lone process announces its listeners on stdout instead.
        """
        writer = logmod.BatchWriter(sys.stderr)
        events = logmod.EventLog(config.log.level, config.log.format == "json", sink=writer)
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
        store = build_store(config, worker)
        try:
            # Only the first process may take back leases: the others run beside it.
            store.open(recover_all=worker == 0)
        except (QueueError, OSError) as exc:
            raise SpoolError(f"server.spool_dir: cannot open the queue {config.queue_path}: {exc}") from None
        scheduler = None
        try:
            recipients = LocalRecipients.from_config(config)
            # One scheduler per spool: in the first process (workers > 1 share the database).
            if worker == 0:
                scheduler = build_scheduler(config, store, events, recipients)
        except BaseException:
            store.close()
            raise
        server = SmtpServer(config, store, events, workers=config.server.workers, recipients=recipients)
        try:
            server.start()
        except OSError as exc:
            store.close()
            raise ConfigError(f"listeners: cannot listen: {exc}") from None
        if scheduler is not None:
            store.on_commit = scheduler.wake
            scheduler.start()
        self._install_signals()
        if ready is not None:
            ready()
        else:
            for listener in server.listeners.values():
                self.announce(listening_line(listener.server_address[0], listener.port, listener.listener.role))
        events("started", spool=config.server.spool_dir, listeners=len(server.listeners), worker=worker)
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                break
            if self._reload:
                self._reload = False
                scheduler = self._do_reload(server, store, events, scheduler)
        grace = server.config.server.grace_period
        events("stopping", grace=grace, open=server.connections.count())
        server.stop(grace)
        finished = scheduler is None or self._stop_scheduler(scheduler, grace, events)
        store.close()
        events("stopped")
        if not finished:
            # Deliveries still talking to slow remotes: their recipients stay leased and are
            # recovered at the next start. Exit now rather than wait for their timeouts.
            self.exit_now = True
        return 0

    @staticmethod
    def _stop_scheduler(scheduler: Scheduler, grace: float, events: logmod.EventLog) -> bool:
        finished = scheduler.stop(grace)
        scheduler.work.close()
        if not finished:
            events("deliveries_abandoned", level=logmod.WARNING,
                   note="still running at the end of the grace period; retried after restart")
        return finished

    def _do_reload(self, server: SmtpServer, store: Store, events: logmod.EventLog,
                   scheduler: Scheduler | None) -> Scheduler | None:
        """All or nothing: a config that is invalid or whose listeners cannot bind changes nothing.

        Returns the scheduler to use from now on: a new one when delivery settings changed.
        """
        try:
            config = self.load_config()
            recipients = LocalRecipients.from_config(config)
        except ConfigError as exc:
            events("reload_failed", level=logmod.WARNING, error=str(exc))
            return scheduler
        old_spool = server.config.server.spool_dir
        if config.server.spool_dir != old_spool:
            events("reload_warning", level=logmod.WARNING, error="server.spool_dir changes need a restart")
            config = cfgmod.replace(config, server={"spool_dir": old_spool})
        old = server.config
        try:
            server.reload(config, recipients)
        except OSError as exc:
            events("reload_failed", level=logmod.WARNING, error=f"cannot listen: {exc}")
            return scheduler
        if scheduler is not None and (old.delivery, old.local, old.smtp.local_domains) != (
            config.delivery, config.local, config.smtp.local_domains
        ):
            try:
                fresh = build_scheduler(config, store, events, recipients)
            except (ConfigError, QueueError) as exc:
                events("reload_warning", level=logmod.WARNING, error=f"delivery keeps its old settings: {exc}")
            else:
                self._stop_scheduler(scheduler, old.server.grace_period, events)
                scheduler = fresh
                store.on_commit = scheduler.wake
                scheduler.start()
        elif scheduler is not None:
            # Same settings, but local.recipients_file may have new contents.
            scheduler.router.recipients = recipients
        store.set_limits(
            min_free_bytes=config.queue.min_free_space,
            max_messages=config.queue.max_messages,
            max_bytes=config.queue.max_bytes,
            batch_max=config.queue.batch_max,
        )
        events.configure(config.log.level, config.log.format == "json")
        events("reloaded", listeners=len(server.listeners))
        return scheduler

    def _install_signals(self) -> None:
        def stop(signum, frame):
            self._stop = True
            self._wake.set()

        def reload(signum, frame):
            self._reload = True
            self._wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)


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
