"""The HTTP endpoint for monitoring ([monitor]): /metrics, /healthz and /readyz.

Under a supervisor it runs as a child process of its own (the supervisor itself forks its
workers and keeps no thread); a lone elemta process serves it from a thread. Either way it
reads what it reports from outside the SMTP and delivery code:

- /metrics: the counters and histograms every process wrote (metrics.py), summed by
  prometheus_client's MultiProcessCollector, and the queue's size and age read from SQLite at
  scrape time (cached for a second, so a scrape storm costs one query a second).
- /healthz (liveness): the supervisor and each child it started are alive.
- /readyz (readiness): every listener bound by one of our processes, the spool writable, free
  space above queue.min_free_space, the process that delivers alive. 503 and a JSON body that
  names each failed check otherwise.

The status of the processes comes from status.json, which the supervisor rewrites whenever a
child starts or ends (write_status); a lone process hands its own status over directly.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from elemta import __version__
from elemta import log as logmod
from elemta.config import Config, split_host_port
from elemta.errors import QueueError
from elemta.queue.admin import QueueAdmin
from elemta.queue.model import PRIORITIES, STATES
from elemta.wakeup import Wakeup

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

QUEUE_CACHE = 1.0  # seconds a queue reading is reused
STATUS_FILE = "status.json"


def monitor_dir(config: Config) -> str:
    """Where the processes leave their metrics and the supervisor its status (in the spool:
    it belongs to the service's user and survives no restart, being wiped at start)."""
    return os.path.join(config.server.spool_dir, "monitor")


def metrics_dir(config: Config) -> str:
    """Where the processes keep their counters: memory, not disk. The files are written on
    every count; on the spool's file system the queue's fsyncs wrote them out too and
    accepting mail cost 7% more (bench/monitor_cost.py), on tmpfs nothing measurable."""
    if config.monitor.metrics_dir:
        return config.monitor.metrics_dir
    # Else a tmpfs the service may write in; the spool (a disk) only when there is none.
    runtime = os.environ.get("RUNTIME_DIRECTORY")  # systemd's RuntimeDirectory=: /run/elemta
    if runtime:
        return os.path.join(runtime.split(":")[0], "metrics")
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        # One directory per user and spool, so two elemtas on one host never share one.
        spool = hashlib.sha256(os.path.abspath(config.server.spool_dir).encode()).hexdigest()[:16]
        return f"/dev/shm/elemta-{os.geteuid()}-{spool}"
    return os.path.join(monitor_dir(config), "metrics")


def write_status(config: Config, status: dict) -> None:
    """Replace status.json at once (rename), so a reader never sees half of it."""
    path = os.path.join(monitor_dir(config), STATUS_FILE)
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(status, handle)
    os.replace(tmp, path)


def mark_listening(config: Config, addresses: list[str]) -> None:
    """An SMTP process bound every listener: listening-<pid> says so (for /readyz)."""
    directory = monitor_dir(config)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    with open(os.path.join(directory, f"listening-{os.getpid()}"), "w", encoding="utf-8") as handle:
        json.dump(addresses, handle)


def clear_listening(config: Config, pid: int | None = None) -> None:
    """Forget pid's listening mark (it ended); None: every mark (a start)."""
    pattern = f"listening-{pid}" if pid is not None else "listening-*"
    for path in glob.glob(os.path.join(monitor_dir(config), pattern)):
        try:
            os.unlink(path)
        except OSError:
            pass


def read_status(config: Config) -> dict | None:
    try:
        with open(os.path.join(monitor_dir(config), STATUS_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def process_status(children: dict[int, str], started: float, config: Config,
                   monitor: list[str] | tuple[str, ...] = ()) -> dict:
    """status.json's content: this process (the supervisor or a lone elemta), its children
    (pid -> role: smtp, delivery, all, monitor), the listeners as bound (a port 0 made real)
    and the monitor's addresses."""
    return {"pid": os.getpid(), "started": started, "version": __version__,
            "workers": config.server.worker_count,
            "listeners": [{"address": lst.address, "role": lst.role} for lst in config.listeners],
            "monitor": list(monitor),
            "children": [{"pid": pid, "role": role} for pid, role in sorted(children.items())]}


def address_of(sock_name: tuple) -> str:
    host, port = sock_name[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- checks -------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _free_bytes(spool: str) -> int:
    st = os.statvfs(spool)
    return st.f_bavail * st.f_frsize


def _spool_writable(spool: str) -> str | None:
    """None if a file can be made in the spool and the queue database can be written."""
    probe = os.path.join(spool, f".readyz-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write in {spool}: {exc.strerror}"
    database = os.path.join(spool, "queue.db")
    if not os.access(database, os.W_OK):
        return f"cannot write {database}"
    return None


class Health:
    """The answers to /healthz and /readyz."""

    def __init__(self, config: Config, status: Callable[[], dict | None]):
        self.config = config
        self.status = status

    def live(self) -> tuple[bool, dict]:
        status = self.status()
        if status is None:
            return False, {"status": "fail", "problems": ["no status from the supervisor"]}
        problems = []
        if status["pid"] != os.getpid() and not alive(status["pid"]):
            problems.append(f"supervisor {status['pid']} is not running")
        for child in status["children"]:
            if child["pid"] != os.getpid() and not alive(child["pid"]):
                problems.append(f"{child['role']} process {child['pid']} is not running")
        return self._answer(problems)

    def ready(self) -> tuple[bool, dict]:
        _, answer = self.live()
        problems = list(answer.get("problems", ()))
        status = self.status()
        if status is not None:
            problems += self._listeners(status)
            roles = {child["role"] for child in status["children"] if alive(child["pid"])}
            if status["pid"] == os.getpid() and not status["children"]:
                roles.add("all")  # a lone process delivers itself
            if not roles & {"delivery", "all"} and not any("delivery" in p for p in problems):
                problems.append("no process is delivering")
        spool = self.config.server.spool_dir
        problem = _spool_writable(spool)
        if problem:
            problems.append(problem)
        try:
            free, floor = _free_bytes(spool), self.config.queue.min_free_space
            if floor and free < floor:
                problems.append(f"{free} bytes free in {spool}, below queue.min_free_space {floor}")
        except OSError as exc:
            problems.append(f"cannot measure the free space of {spool}: {exc.strerror}")
        return self._answer(problems)

    def _listeners(self, status: dict) -> list[str]:
        """Every SMTP process alive has bound all its listeners (it leaves listening-<pid>
        once it has: /proc/net, which would show the sockets, is hidden by the unit's
        ProcSubset=pid)."""
        smtp = [c["pid"] for c in status["children"] if c["role"] in ("smtp", "all")]
        if not status["children"]:
            smtp = [status["pid"]]  # a lone process
        running = [pid for pid in smtp if alive(pid)]
        if not running:
            return ["no SMTP worker is running"]
        directory = monitor_dir(self.config)
        return [f"SMTP worker {pid} has not bound its listeners" for pid in running
                if not os.path.exists(os.path.join(directory, f"listening-{pid}"))]

    @staticmethod
    def _answer(problems: list[str]) -> tuple[bool, dict]:
        if problems:
            return False, {"status": "fail", "problems": problems}
        return True, {"status": "ok"}


# ---- the queue's figures --------------------------------------------------------------------


class QueueCollector:
    """Queue size and age, read at scrape time from the queue database (read-only)."""

    def __init__(self, queue_path: str):
        self.queue_path = queue_path
        self._lock = threading.Lock()
        self._cached: tuple[float, list] = (0.0, [])

    def collect(self):
        with self._lock:
            when, families = self._cached
            if time.monotonic() - when > QUEUE_CACHE:
                families = self._read()
                self._cached = (time.monotonic(), families)
        return families

    def _read(self) -> list:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("elemta_queue_readable", "1 if the queue database could be read.")
        try:
            with QueueAdmin(self.queue_path) as admin:
                stats = admin.stats()
        except QueueError:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        messages = GaugeMetricFamily("elemta_queue_messages", "Messages with a recipient still to "
                                     "deliver, by priority.", labels=["priority"])
        for priority in PRIORITIES:
            messages.add_metric([priority], stats.messages_by_priority.get(priority, 0))
        recipients = GaugeMetricFamily("elemta_queue_recipients", "Recipients in the queue by "
                                       "state (delivered and failed ones are kept for "
                                       "delivery.retention).", labels=["state"])
        for state in STATES:
            recipients.add_metric([state], stats.recipients_by_state.get(state, 0))
        size = GaugeMetricFamily("elemta_queue_bytes", "Size of the messages still to deliver.")
        size.add_metric([], stats.bytes)
        oldest = GaugeMetricFamily("elemta_queue_oldest_message_age_seconds", "Age of the oldest "
                                   "message still to deliver; 0 when there is none.")
        oldest.add_metric([], stats.oldest_age or 0)
        return [up, messages, recipients, size, oldest]


class HealthCollector:
    """Readiness, the spool's free space and the processes, as metrics (alerts need them)."""

    def __init__(self, health: Health):
        self.health = health

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        config = self.health.config
        ready, _ = self.health.ready()
        families = []

        def gauge(name: str, doc: str, value: float, labels: dict | None = None) -> None:
            family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            family.add_metric(list((labels or {}).values()), value)
            families.append(family)

        gauge("elemta_ready", "1 when /readyz would answer 200, else 0.", int(ready))
        try:
            gauge("elemta_spool_free_bytes", "Free space on the spool's file system for the service's "
                  "user.", _free_bytes(config.server.spool_dir))
        except OSError:
            pass
        gauge("elemta_spool_min_free_bytes", "queue.min_free_space: below it mail is refused with 452.",
              config.queue.min_free_space)
        gauge("elemta_info", "The running elemta's version.", 1, {"version": __version__})
        status = self.health.status()
        if status is not None:
            gauge("elemta_start_time_seconds", "When the daemon started, in seconds since the epoch.",
                  status["started"])
            processes = GaugeMetricFamily("elemta_processes", "Processes alive by role.", labels=["role"])
            counts = {"smtp": 0, "delivery": 0, "all": 0, "monitor": 0}
            for child in status["children"]:
                if alive(child["pid"]):
                    counts[child["role"]] = counts.get(child["role"], 0) + 1
            if not status["children"]:
                counts["all"] = 1  # a lone process: this one
            for role, count in counts.items():
                processes.add_metric([role], count)
            families.append(processes)
        return families


# ---- HTTP ---------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: MonitorHttp
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep open

    def version_string(self) -> str:
        return "elemta"  # not the Python version: nothing for a stranger to fingerprint

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.owner.timeout)  # for reading the request

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = owner.exposition()
            self._send(200, body, content_type)
        elif path in ("/healthz", "/readyz"):
            ok, answer = owner.health.live() if path == "/healthz" else owner.health.ready()
            self._send(200 if ok else 503, json.dumps(answer).encode() + b"\n", "application/json")
        else:
            self._send(404, b'{"status": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}\n',
                       "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass  # a scrape every few seconds is not news; failures are logged by the server


def bind(config: Config) -> list[socket.socket]:
    """Listening sockets for monitor.listen (OSError if one cannot be bound). The supervisor
    binds them once, at start, so a bad address stops the start and a restarted monitor
    process serves the same sockets."""
    sockets = []
    try:
        for address in config.monitor.listen:
            host, port = split_host_port(address)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(64)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class MonitorHttp(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: Monitor, sock: socket.socket):
        self.owner = owner
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()

    def process_request(self, request, client_address) -> None:
        # The connection cap: a scrape storm or a stuck client cannot pile up threads.
        if not self.owner.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(self.owner.timeout)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.owner.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner.slots.release()


class Monitor:
    """The endpoint: one HTTP server per monitor.listen address, each on a thread."""

    def __init__(self, config: Config, status: Callable[[], dict | None], log: logmod.EventLog):
        self.config = config
        self.log = log
        self.timeout = config.monitor.timeout
        self.slots = threading.BoundedSemaphore(config.monitor.max_connections)
        self.health = Health(config, status)
        self.servers: list[MonitorHttp] = []
        self._registry: CollectorRegistry | None = None  # made by serve()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        registry = self._registry
        assert registry is not None  # serve() made it before the first request
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def start(self, sockets: list[socket.socket] | None = None) -> list[tuple[str, int]]:
        """Serve on sockets (else bind monitor.listen: OSError if an address cannot be
        bound); return the addresses served."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir(self.config))
        registry.register(QueueCollector(self.config.queue_path))
        registry.register(HealthCollector(self.health))
        self._registry = registry
        for sock in bind(self.config) if sockets is None else sockets:
            self.servers.append(MonitorHttp(self, sock))
        bound = []
        for server in self.servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                             name="monitor-http", daemon=True).start()
            host, port = server.server_address[:2]
            bound.append((str(host), port))
        return bound

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.servers.clear()


def announce_line(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"elemta: monitor on http://{shown}:{port}/"


def run_process(config: Config, sockets: list[socket.socket]) -> int:
    """The monitor child of a supervisor: serve on the supervisor's sockets until SIGTERM."""
    try:
        target = logmod.open_target(config.log)
    except OSError:
        target = logmod.Target()  # the supervisor opened it a moment ago; say it here at least
    events = logmod.EventLog(config.log.level, config.log.format == "json", target=target)
    # The handlers only note the signal (see elemta/wakeup.py); this loop acts on it.
    wake = Wakeup()
    noted: list[int] = []

    def note(signum, frame) -> None:
        noted.append(signum)
        wake.poke()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, note)
    monitor = Monitor(config, lambda: read_status(config), events)
    monitor.start(sockets)
    while True:
        wake.wait(1.0)
        signums, noted[:] = noted[:], []
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            break
        if signums:  # SIGHUP, SIGUSR1: [monitor] changes need a restart; the log is reopened
            try:
                target.reopen()
            except OSError:
                pass
    monitor.stop()
    return 0
