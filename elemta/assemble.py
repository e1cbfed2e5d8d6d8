"""The parts of a daemon process, built from its Config: the store, the spool check, the log,
the resolver, the plugins, the tables the workers share and the delivery scheduler.

daemon.py runs them and supervisor.py starts the processes; both call these, as do elemtactl
(check_startup, build_resolver) and the benches.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import sqlite3
import time
from collections.abc import Callable

from elemta import filemodes, shm
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
from elemta.plugins import api as plugin_api
from elemta.plugins.builtin.dkim import DkimPlugin
from elemta.plugins.manager import Manager
from elemta.queue import db, integrity, schema
from elemta.queue.store import Store
from elemta.queue.work import WorkQueue
from elemta.ratelimit import SharedRateLimit
from elemta.smtp.connections import new_counts
from elemta.smtp.limits import size_for as limits_size_for
from elemta.smtp.tls import ServerTls


class SpoolError(ElemtaError):
    """The spool or its queue database cannot be opened."""


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
