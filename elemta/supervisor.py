"""Several elemta processes: server.workers SMTP workers and, with server.delivery_process
(the default), one delivery process.

Python runs one thread at a time per process, so one process tops out near one core.  The
supervisor forks its children before any thread exists.  Each SMTP worker is an elemta
without a scheduler (Daemon.serve in the "smtp" role: listeners, sessions, its own
group-commit writer) and binds the listeners with SO_REUSEPORT, so the kernel spreads
connections over them.  The delivery process runs the scheduler alone, so receiving and
delivering each have a core, and a crash on one side leaves the other running (as Postfix
keeps smtpd apart from qmgr and smtp).  SQLite serialises the writers of the processes on the
one WAL database; queue IDs carry the process number, so they never clash.  After each commit
of new mail a worker writes a byte into a pipe the delivery process reads: its wake-up.

With delivery_process off, worker 0 runs the scheduler itself (the "all" role), and a lone
worker runs without a supervisor.

The supervisor itself holds no queue and no sessions: it forwards SIGTERM/SIGINT and SIGHUP to
the children, starts a child again if one dies, and exits when they have all stopped.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable

from elemta import filemodes, metrics, monitor, privileges, sdnotify
from elemta import log as logmod
from elemta.assemble import Shared, SpoolError, check_startup, new_shared, open_log, prepare_spool
from elemta.config import Config
from elemta.daemon import DELIVERY_WORKER, Daemon, exit_code, listening_line
from elemta.errors import ConfigError
from elemta.pidfile import PidFile, PidFileError
from elemta.wakeup import Wakeup

PR_SET_PDEATHSIG = 1  # linux/prctl.h
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)
# A child still running this long after SIGTERM is killed: sessions get grace_period, then
# deliveries grace_period (one after the other in a worker that does both), then 10 s to
# write results; the margin covers the rest. Under systemd's TimeoutStopSec=90s at the default.
STOP_MARGIN = 15.0
MONITOR_WORKER = DELIVERY_WORKER + 1  # the [monitor] process: not a queue writer, no queue IDs
READY_TIMEOUT = 60.0
EX_SOFTWARE = 70


def main_loop(load_config: Callable[[], Config]) -> int:
    """Run elemta: one process, or a supervisor and server.workers worker processes."""
    def announce(line: str) -> None:
        print(line, flush=True)

    os.umask(filemodes.UMASK)  # whatever we inherited: nothing elemta creates is for others
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # logrotate's signal, before its handler: never fatal
    notifier = sdnotify.Notifier()
    pidfile = None
    if not ipv6_available():
        load_config = _WithoutIpv6(load_config)
    try:
        config = load_config()
        pidfile = become_service(config)
        check_startup(config)  # as the service's user, before any child: one error line
        events = logmod.EventLog(config.log.level, config.log.format == "json", target=open_log(config))
        warning = open_files_warning(config)
        if warning:
            events("resource_warning", level=logmod.WARNING, error=warning)
        skipped = getattr(load_config, "skipped", ())
        if skipped:
            events("listeners_skipped", level=logmod.WARNING, addresses=",".join(skipped),
                   error="IPv6 is turned off in this kernel")
        warning = prepare_spool(config)  # the queue: checked, created or upgraded, once
        if warning:
            events("queue_check_unfinished", level=logmod.WARNING, error=warning)
        if config.monitor.listen:  # before any fork: every child then counts into the files
            try:
                metrics.enable(monitor.metrics_dir(config))
            except OSError as exc:
                raise ConfigError(f"monitor.metrics_dir: {exc}") from None
        if config.server.worker_count > 1 or config.server.delivery_process:
            return Supervisor(load_config, announce, notifier, pidfile, events).run(config)
        return Daemon(load_config, announce, notifier=notifier).run()
    except (ConfigError, SpoolError) as exc:
        for line in str(exc).split("\n"):  # a ConfigError's problems: one line each
            print(f"elemta: {line}", file=sys.stderr)
        return exit_code(exc) or EX_SOFTWARE  # 78 or 73 for these two
    finally:
        notifier.stopping()
        metrics.remove()  # counters live in memory: nothing is left of them after a stop
        if pidfile is not None:
            pidfile.release()


def ipv6_available() -> bool:
    """False on a kernel booted with ipv6.disable=1 (no AF_INET6 sockets at all)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def without_ipv6(config: Config) -> tuple[Config, list[str]]:
    """config without its IPv6 listeners, and their addresses: Debian's elemta.toml listens on
    [::] beside 0.0.0.0, which a kernel without IPv6 cannot open (as Postfix then turns its
    IPv6 support off with a warning).  ConfigError if no listener would be left."""
    dropped = [listener.address for listener in config.listeners if ":" in listener.host]
    kept = tuple(listener for listener in config.listeners if ":" not in listener.host)
    if dropped and not kept:
        raise ConfigError("listeners: IPv6 is turned off in this kernel and every listener is an IPv6 address")
    return dataclasses.replace(config, listeners=kept), dropped


class _WithoutIpv6:
    """load_config with the IPv6 listeners left out; skipped: the ones left out last time."""

    def __init__(self, load_config: Callable[[], Config]) -> None:
        self.load_config = load_config
        self.skipped: list[str] = []

    def __call__(self) -> Config:
        config, self.skipped = without_ipv6(self.load_config())
        return config


def become_service(config: Config) -> PidFile:
    """Make the spool and the maildrop, take server.user's identity if started as root, and
    lock the spool with the PID file (SpoolError or ConfigError if any of it cannot be done)."""
    who = privileges.target(config)
    try:
        privileges.prepare_dirs(config, who)
    except OSError as exc:
        raise SpoolError(f"server.spool_dir: cannot create {exc.filename or config.server.spool_dir}: "
                         f"{exc.strerror or exc}") from None
    if who is not None:
        try:
            privileges.drop(who)
        except OSError as exc:
            raise ConfigError(f"server.user: cannot become {who.user}: {exc.strerror or exc}") from None
    pidfile = PidFile(config.server.spool_dir)
    try:
        pidfile.acquire()
    except PidFileError as exc:
        raise SpoolError(f"server.spool_dir: {exc.strerror}") from None
    except OSError as exc:
        raise SpoolError(f"server.spool_dir: cannot write {pidfile.path}: {exc.strerror or exc}") from None
    return pidfile


# Descriptors one SMTP worker may need: a socket per connection, and about as many again for
# TLS, plugins' DNS lookups and the queue (Postfix's smtpd needs two per client too), plus a
# fixed part (listeners, the queue database and its WAL, logs, pipes).
FILES_PER_CONNECTION = 2
FILES_FIXED = 64


def open_files_warning(config: Config) -> str | None:
    """Raise RLIMIT_NOFILE's soft limit to what server.max_connections needs (up to the hard
    limit); a warning naming what to raise when even the hard limit is too low."""
    needed = config.server.max_connections * FILES_PER_CONNECTION + FILES_FIXED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (f"open files limit {soft} is below the {needed} that server.max_connections = "
            f"{config.server.max_connections} may need; raise LimitNOFILE= in elemta.service "
            f"(or ulimit -n), or lower server.max_connections")


def _stop_with_parent(supervisor: int) -> None:
    """Ask Linux to SIGTERM this worker when its supervisor dies (prctl PR_SET_PDEATHSIG),
    so a supervisor killed with SIGKILL leaves no worker serving on its own."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's own SIGTERM handling still stops the workers
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, load_config: Callable[[], Config], announce: Callable[[str], None],
                 notifier: sdnotify.Notifier | None = None, pidfile: PidFile | None = None,
                 events: logmod.EventLog | None = None):
        self._load_config = load_config
        self.announce = announce
        self.notifier = notifier or sdnotify.Notifier({})
        self.pidfile = pidfile
        self.events = events or logmod.EventLog()  # writes at once: no thread may exist before a fork
        self._reserved: dict[str, socket.socket] = {}  # "host" -> a socket holding its port 0
        self._pinned: dict[str, str] = {}  # listener address with port 0 -> with its real port
        self._children: dict[int, int] = {}  # pid -> worker number (DELIVERY_WORKER: delivery)
        self._roles: dict[int, str] = {}  # worker number -> Daemon role
        self._wake_pipe: tuple[int, int] | None = None  # SMTP workers -> delivery process
        self._wake = Wakeup()  # poked by the signal handlers: never a lock in a handler
        self._pending: list[int] = []  # signals to act on, in order
        self._config: Config | None = None
        self._started = time.time()
        self._monitor_sockets: list[socket.socket] = []
        self._shared: Shared | None = None  # made in run()
        self._pid = os.getpid()  # the supervisor's: a child runs this object's methods too

    # ---- configuration -----------------------------------------------------------------------

    def load_config(self) -> Config:
        return self._pin_ports(self._load_config())

    def _pin_ports(self, config: Config) -> Config:
        """Replace every port 0 by the port reserved for it, so that all workers (and their
        reloads) listen on the same port.

        The supervisor picks the ports, also for a listener a reload adds: it loads the new
        config before it signals the workers, and keeps its picks in the shared memory, where
        each worker's reload finds them (a worker's own copy of `_pinned` is from its fork)."""
        if self._shared is not None and os.getpid() != self._pid:
            self._pinned.update(json.loads(self._shared.region.get("pinned-ports") or b"{}"))
        listeners = []
        for listener in config.listeners:
            if listener.port == 0:
                if listener.address not in self._pinned:
                    self._pinned[listener.address] = self._reserve(listener.host)
                listener = dataclasses.replace(listener, address=self._pinned[listener.address])
            listeners.append(listener)
        if self._shared is not None and os.getpid() == self._pid:
            self._shared.region.put("pinned-ports", json.dumps(self._pinned).encode())
        return dataclasses.replace(config, listeners=tuple(listeners))

    def _reserve(self, host: str) -> str:
        """Pick a free port for host and keep it: a bound, never-listening SO_REUSEPORT socket."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        self._reserved[f"{host}:{port}"] = sock
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # ---- running -----------------------------------------------------------------------------

    def run(self, config: Config) -> int:
        self.events.configure(config.log.level, config.log.format == "json")
        # The workers' shared counters (connection caps, [limits]) and the ports picked for
        # port 0: made before any fork, kept here so that a worker started again sees them.
        self._shared = new_shared(config)
        config = self._pin_ports(config)
        workers = config.server.worker_count
        if config.server.delivery_process:
            self._roles = dict.fromkeys(range(workers), "smtp")
            self._roles[DELIVERY_WORKER] = "delivery"
            self._wake_pipe = os.pipe()
            os.set_blocking(self._wake_pipe[1], False)  # a full pipe already means "wake up"
        else:
            self._roles = {0: "all", **dict.fromkeys(range(1, workers), "smtp")}
        self._config = config
        # Handlers first, so a SIGTERM that comes while workers start is not lost; they note
        # the signal only, and a child resets them before anything else.
        self._install_signals()
        monitor.clear_listening(config)  # marks a killed run left behind
        try:
            self._monitor_sockets = monitor.bind(config)
        except OSError as exc:
            raise ConfigError(f"monitor.listen: cannot listen: {exc}") from None
        ready_read, ready_write = os.pipe()
        for worker in self._roles:
            self._spawn(worker, ready_write)
        os.close(ready_write)
        if self._monitor_sockets:  # not among those waited for: mail flows without it
            self._roles[MONITOR_WORKER] = "monitor"
            self._spawn(MONITOR_WORKER, None)
        failed = self._wait_ready(ready_read, len(self._roles) - bool(self._monitor_sockets))
        os.close(ready_read)
        if failed is not None:
            self._signal_all(signal.SIGTERM)
            self._reap_all(config.server.grace_period + 10)
            return failed
        for listener in config.listeners:
            self.announce(listening_line(listener.host, listener.port, listener.role))
        for sock in self._monitor_sockets:
            self.announce(monitor.announce_line(*sock.getsockname()[:2]))
        smtp = [str(pid) for pid, worker in self._children.items() if self._roles[worker] in ("smtp", "all")]
        delivery = [str(pid) for pid, worker in self._children.items() if self._roles[worker] == "delivery"]
        self.events("supervising", workers=workers, pids=",".join(smtp), delivery=",".join(delivery) or "-")
        self.notifier.ready(self._status(config))
        return self._supervise(config)

    def _status(self, config: Config) -> str:
        ports = ", ".join(str(listener.port) for listener in config.listeners)
        delivery = "a delivery process" if config.server.delivery_process else "delivery in worker 0"
        return f"{config.server.worker_count} SMTP worker(s) on port(s) {ports}, {delivery}"

    def _spawn(self, worker: int, ready_write: int | None) -> None:
        supervisor = os.getpid()
        # Signals wait until the child has its own handlers: a SIGTERM that reached the child
        # before it reset the supervisor's (which only note it) would be lost with it.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            self._children[pid] = worker
            self._write_status()
            return
        # The child: a whole elemta process.  Never return into the supervisor's code.
        code = EX_SOFTWARE
        try:
            for sock in self._reserved.values():
                sock.close()
            self._wake.close()  # the supervisor's; the child makes its own
            self.notifier.forget()
            if self.pidfile is not None:
                self.pidfile.close_in_child()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the child's own handler: never fatal
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            _stop_with_parent(supervisor)
            if self._roles[worker] == "monitor":
                assert self._config is not None  # run() keeps it before any fork
                code = monitor.run_process(self._config, self._monitor_sockets)
                return
            for sock in self._monitor_sockets:
                sock.close()

            def ready() -> None:
                if ready_write is not None:
                    os.write(ready_write, b"1")
                    os.close(ready_write)

            daemon = Daemon(self.load_config, self.announce, role=self._roles[worker],
                            wake_pipe=self._wake_pipe, shared=self._shared)
            try:
                code = daemon.serve(self.load_config(), worker=worker, ready=ready)
            except (ConfigError, SpoolError) as exc:
                for line in str(exc).split("\n"):  # a ConfigError's problems: one line each
                    print(f"elemta: {line}", file=sys.stderr, flush=True)
                code = exit_code(exc) or EX_SOFTWARE  # 78 or 73 for these two
            except Exception as exc:  # noqa: BLE001 -- a child must always end in os._exit
                print(f"elemta: worker {worker}: {exc}", file=sys.stderr, flush=True)
                code = exit_code(exc) or EX_SOFTWARE
        finally:
            sys.stderr.flush()
            os._exit(code)

    def _wait_ready(self, ready_read: int, workers: int) -> int | None:
        """None once every worker listens; else the exit status of the one that failed."""
        deadline = time.monotonic() + READY_TIMEOUT
        ready = 0
        os.set_blocking(ready_read, False)
        while ready < workers:
            try:
                ready += len(os.read(ready_read, workers))
            except BlockingIOError:
                pass
            for pid in list(self._children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del self._children[pid]
                    return os.waitstatus_to_exitcode(status) or EX_SOFTWARE
            if time.monotonic() > deadline:
                return EX_SOFTWARE
            time.sleep(0.01)
        return None

    def _install_signals(self) -> None:
        def note(signum, frame):
            self._pending.append(signum)
            self._wake.poke()

        for sig in HANDLED_SIGNALS:
            signal.signal(sig, note)

    def _supervise(self, config: Config) -> int:
        stopping = False
        kill_at = float("inf")
        forced = False
        status = 0
        tick = min(1.0, self.notifier.watchdog_interval or 1.0)
        while self._children:
            self.notifier.watchdog()
            self._wake.wait(tick)
            if time.monotonic() >= kill_at:  # a child stuck past its grace: the stop must end
                for pid, worker in self._children.items():
                    self.events("stop_forced", level=logmod.WARNING, worker=worker, pid=pid,
                                role=self._roles[worker])
                self._signal_all(signal.SIGKILL)
                kill_at = float("inf")
                forced = True
            while self._pending:
                signum = self._pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    kill_at = time.monotonic() + 2 * config.server.grace_period + STOP_MARGIN
                    self.notifier.stopping()
                    self.events("stopping", workers=len(self._children))
                    self._signal_all(signal.SIGTERM)
                elif signum == signal.SIGUSR1:  # logrotate: every process opens its log again
                    try:
                        self.events.target.reopen()
                    except OSError as exc:
                        self.events("log_reopen_failed", level=logmod.WARNING, error=str(exc)[:200])
                    self._signal_all(signal.SIGUSR1)
                elif signum == signal.SIGHUP and not stopping:
                    self.notifier.reloading()
                    config = self._reload(config)
                    self.notifier.ready(self._status(config))
            for pid, worker, code in self._reaped():
                if code != 0:
                    status = code
                if self._roles[worker] in ("smtp", "all") and self._shared is not None:
                    self._shared.connections.forget_worker(worker)  # its connections closed with it
                if not stopping:
                    self.events("worker_died", level=logmod.WARNING, worker=worker, pid=pid, status=code)
                    self._spawn(worker, None)
                    self.notifier.status(f"{self._status(config)}; worker {worker} restarted at "
                                         f"{time.strftime('%H:%M:%S')} (exit status {code})")
        self.events("stopped")
        return EX_SOFTWARE if forced else max(0, status)

    def _reload(self, config: Config) -> Config:
        try:
            new = self.load_config()
        except ConfigError as exc:
            self.events("reload_failed", level=logmod.WARNING, error=str(exc))
            return config
        if new.server.worker_count != config.server.worker_count:
            self.events("reload_warning", level=logmod.WARNING, error="server.workers changes need a restart")
        try:
            self.events.target.reopen()  # logrotate may send SIGHUP instead of SIGUSR1
        except OSError as exc:
            self.events("log_reopen_failed", level=logmod.WARNING, error=str(exc)[:200])
        self._signal_all(signal.SIGHUP)  # each worker reloads (all or nothing) on its own
        return config

    def _reaped(self) -> list[tuple[int, int, int]]:
        gone = []
        for pid in list(self._children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                gone.append((pid, self._children.pop(pid), os.waitstatus_to_exitcode(status)))
                metrics.process_dead(pid)  # its open-connections gauge no longer counts
                if self._config is not None:
                    monitor.clear_listening(self._config, pid)
        if gone:
            self._write_status()
        return gone

    def _write_status(self) -> None:
        """status.json for the monitor and elemtactl status: who runs, in which role."""
        if self._config is None:
            return
        children = {pid: self._roles[worker] for pid, worker in self._children.items()}
        bound = [monitor.address_of(sock.getsockname()) for sock in self._monitor_sockets]
        try:
            monitor.write_status(self._config, monitor.process_status(children, self._started, self._config, bound))
        except OSError as exc:
            self.events("status_failed", level=logmod.WARNING, error=str(exc)[:200])

    def _signal_all(self, signum: int) -> None:
        for pid in self._children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _reap_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._children and time.monotonic() < deadline:
            self._reaped()
            time.sleep(0.05)
        for pid in list(self._children):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            del self._children[pid]
