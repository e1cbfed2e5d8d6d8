"""Prometheus metrics of every elemta process, summed when they are scraped.

elemta runs as several processes (SMTP workers, the delivery process, a monitor), and a scrape
must see their sum. prometheus_client's multiprocess mode does exactly that: each process
keeps its counters and histograms in a memory-mapped file of its own, in one directory
(`PROMETHEUS_MULTIPROC_DIR`), and the monitor adds the files up on each scrape. A worker that
is restarted starts a new file; the old one still counts, so a counter never goes backwards.

prometheus_client chooses its storage when it is first imported, so it is imported only in
`enable()`, after the variable is set and before any child is forked. Until then (and when
`monitor.listen` is empty) every metric here is `OFF`, whose methods do nothing: the hot paths
call `metrics.NAME.labels(...).inc()` either way and pay nothing when no one scrapes.

An update is not written at once: it is appended to a queue (deque.append: atomic, no lock),
and a thread of each process (`start()`) applies the queue every FLUSH_INTERVAL, adding up the
increments of each series first. prometheus_client's multiprocess values take one lock per
process for every write; with ten session threads counting at once that lock cost 7.5 µs of
CPU per increment instead of 1, and accepting mail 7% (bench/monitor_cost.py). A scrape sees
figures at most FLUSH_INTERVAL old.

Label values come from short fixed sets (commands, reply classes, reasons, listener
addresses from the configuration, destination keys capped in number): never a queue ID, an
address or a raw domain, which would make every message a new series.
"""

from __future__ import annotations

import collections
import glob
import os
import stat
import sys
import threading

ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: SMTP transactions and plugin calls take milliseconds to minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Seconds from the 250 to delivery: a minute to the five days of delivery.max_lifetime.
DELAY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 432000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Off:
    """A metric that is not collected: every method does nothing."""

    def labels(self, *values, **named) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


OFF = _Off()
FLUSH_INTERVAL = 0.5  # seconds between applying the queued updates

# (bound method of a prometheus_client child, amount): the updates not applied yet.
_pending: collections.deque = collections.deque()


class _Series:
    """One labelled series: its updates go to the queue."""

    __slots__ = ("_dec", "_inc", "_observe")

    def __init__(self, child) -> None:
        self._inc = getattr(child, "inc", None)
        self._dec = getattr(child, "dec", None)
        self._observe = getattr(child, "observe", None)

    def inc(self, amount: float = 1) -> None:
        _pending.append((self._inc, amount))

    def dec(self, amount: float = 1) -> None:
        _pending.append((self._dec, amount))

    def observe(self, value: float) -> None:
        _pending.append((self._observe, value))


class _Queued(_Series):
    """A metric whose series are made once per label values (labels() takes a lock and builds
    a key in prometheus_client: once per series here, not once per update)."""

    __slots__ = ("_lock", "_metric", "_series")

    def __init__(self, metric) -> None:
        labelled = bool(getattr(metric, "_labelnames", ()))
        super().__init__(None if labelled else metric)
        self._metric = metric
        self._series: dict[tuple, _Series] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> _Series:
        series = self._series.get(values)
        if series is None:
            with self._lock:
                series = self._series.get(values)
                if series is None:
                    series = self._series[values] = _Series(self._metric.labels(*values))
        return series


def flush() -> None:
    """Apply the queued updates: increments of one series added up, one write each."""
    sums: dict = {}
    observed = []
    while True:
        try:
            method, amount = _pending.popleft()
        except IndexError:
            break
        if method.__name__ == "observe":
            observed.append((method, amount))
        else:
            sums[method] = sums.get(method, 0) + amount
    for method, amount in sums.items():
        method(amount)
    for method, value in observed:
        method(value)


_flusher_pid = 0
_defined: dict = {}  # NAME -> its prometheus_client metric, once enabled


def defined() -> dict:
    """The prometheus_client metrics behind the names above (empty until enable())."""
    return dict(_defined)


def start() -> None:
    """Apply the queue from a thread of this process (call once in each process that counts,
    after any fork: a thread does not survive one)."""
    global _flusher_pid
    if not _enabled or _flusher_pid == os.getpid():
        return
    _flusher_pid = os.getpid()

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(FLUSH_INTERVAL):
            flush()

    threading.Thread(target=run, name="metrics", daemon=True).start()

# SMTP intake (the workers).
CONNECTIONS = OFF  # listener, outcome
CONNECTIONS_OPEN = OFF
REPLIES = OFF  # command, class
MESSAGES = OFF  # listener, result (accepted, failed)
REJECTIONS = OFF  # command, reply
RECEIVED_BYTES = OFF
TLS_HANDSHAKES = OFF  # direction, version, result
AUTH = OFF  # mechanism, result
# Plugins.
PLUGIN_CALLS = OFF  # plugin, hook, verdict
PLUGIN_ERRORS = OFF  # plugin, kind
PLUGIN_SECONDS = OFF  # plugin
# The queue writer.
COMMIT_BATCH = OFF
COMMIT_SECONDS = OFF
# Delivery.
DELIVERY_ATTEMPTS = OFF  # result, destination
DELIVERY_DELAY = OFF
DNS_CACHE = OFF  # result (hit, miss)
REPORTS = OFF  # kind (bounce, delay)

_enabled = False


def enabled() -> bool:
    return _enabled


def enable(directory: str, fresh: bool = True) -> None:
    """Collect metrics in directory from now on, in this process and the ones it forks.

    fresh: remove what an earlier run left there (the daemon's start; not a reload)."""
    global _enabled
    if _enabled:
        return
    if "prometheus_client" in sys.modules and os.environ.get(ENV) != directory:
        # Imported without the directory: it would count in this process only. A bug.
        raise RuntimeError("prometheus_client was imported before metrics.enable()")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _check_private(directory)
    if fresh:
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.unlink(path)
    os.environ[ENV] = directory
    _define()
    _replies.clear()
    _enabled = True


def _check_private(directory: str) -> None:
    """The directory must be ours and closed to others: under /dev/shm anyone could have made
    it first, and then fed our scrapes or read them."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(
            f"{directory} is not a directory of this user's that others cannot write "
            f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); remove it or set monitor.metrics_dir"
        )


def _define() -> None:
    from prometheus_client import Counter, Gauge, Histogram

    g = globals()

    def counter(name, doc, labels=()):
        return Counter(name, doc, labels, registry=None)

    defined = dict(
        CONNECTIONS=counter("elemta_smtp_connections", "SMTP connections by listener and outcome "
                            "(accepted, or the reason they were refused).", ("listener", "outcome")),
        CONNECTIONS_OPEN=Gauge("elemta_smtp_connections_open", "SMTP connections open now.",
                               registry=None, multiprocess_mode="livesum"),
        REPLIES=counter("elemta_smtp_replies", "SMTP replies sent, by the command answered and "
                        "the reply's class (2xx, 3xx, 4xx, 5xx).", ("command", "class")),
        MESSAGES=counter("elemta_smtp_messages", "Messages handed to the queue at the end of DATA "
                         "or BDAT: accepted (250) or failed (the queue could not take it). Refused "
                         "ones are in elemta_smtp_rejections_total.", ("listener", "result")),
        REJECTIONS=counter("elemta_smtp_rejections", "4xx and 5xx replies to the greeting "
                           "(connect), MAIL, RCPT, DATA, BDAT, AUTH and STARTTLS, by command and "
                           "reply (code and enhanced code: the reason).", ("command", "reply")),
        RECEIVED_BYTES=counter("elemta_smtp_received_bytes", "Octets of accepted messages."),
        TLS_HANDSHAKES=counter("elemta_tls_handshakes", "TLS handshakes, inbound (in) and "
                               "outbound (out), by protocol version and result.",
                               ("direction", "version", "result")),
        AUTH=counter("elemta_smtp_auth", "SMTP AUTH attempts by mechanism and result.",
                     ("mechanism", "result")),
        PLUGIN_CALLS=counter("elemta_plugin_calls", "Plugin calls by plugin, hook and verdict.",
                             ("plugin", "hook", "verdict")),
        PLUGIN_ERRORS=counter("elemta_plugin_errors", "Plugin calls that failed (error) or ran "
                              "out of time (timeout).", ("plugin", "kind")),
        PLUGIN_SECONDS=Histogram("elemta_plugin_call_seconds", "Time of plugin calls.", ("plugin",),
                                 buckets=LATENCY_BUCKETS, registry=None),
        COMMIT_BATCH=Histogram("elemta_queue_commit_batch_messages", "Messages per group commit.",
                               buckets=BATCH_BUCKETS, registry=None),
        COMMIT_SECONDS=Histogram("elemta_queue_commit_seconds", "Time of a group commit, fsync "
                                 "included.", buckets=LATENCY_BUCKETS, registry=None),
        DELIVERY_ATTEMPTS=counter("elemta_delivery_attempts", "Delivery attempts per recipient by "
                                  "result (delivered, deferred, failed) and destination.",
                                  ("result", "destination")),
        DELIVERY_DELAY=Histogram("elemta_delivery_delay_seconds", "Time from the 250 that accepted "
                                 "a message to its delivery, per recipient.",
                                 buckets=DELAY_BUCKETS, registry=None),
        DNS_CACHE=counter("elemta_dns_cache_lookups", "DNS lookups by the delivery cache: hit or "
                          "miss.", ("result",)),
        REPORTS=counter("elemta_reports_sent", "Delivery status notifications queued: bounce, "
                        "delay or success (NOTIFY=SUCCESS).", ("kind",)),
    )
    _defined.update(defined)
    g.update({name: _Queued(metric) for name, metric in defined.items()})


def remove() -> None:
    """At the daemon's stop: remove the files and the directory (it is in memory)."""
    directory = os.environ.get(ENV) if _enabled else None
    if not directory:
        return
    for path in glob.glob(os.path.join(directory, "*.db")):
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        os.rmdir(directory)
    except OSError:
        pass


def process_dead(pid: int) -> None:
    """A child exited: its live gauges (open connections) no longer count."""
    if _enabled:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, os.environ[ENV])


# Commands whose 4xx/5xx replies are refusals worth telling apart by reply ("connect" is the
# greeting).
REFUSING = frozenset({"connect", "MAIL", "RCPT", "DATA", "BDAT", "AUTH", "STARTTLS"})
_replies: dict[tuple[str, int], _Off | _Series] = {}  # (command, code // 100) -> its REPLIES child


MAX_DESTINATIONS = 100  # distinct destination labels per process; later ones are "other"
_destinations: set[str] = set()


def destination(key: str) -> str:
    """The label for a delivery's destination (the next hop as the scheduler keys it: the MX
    hosts, the relayhost, lmtp, maildir), capped so a queue to 10,000 domains cannot make
    10,000 series."""
    if key in _destinations:
        return key
    if len(_destinations) >= MAX_DESTINATIONS:
        return "other"
    _destinations.add(key)
    return key


def count_reply(command: str, code: int, esc: str) -> None:
    """One SMTP reply sent in answer to command (a verb, "connect", or "unknown")."""
    if not _enabled:
        return
    key = (command, code // 100)
    child = _replies.get(key)
    if child is None:
        child = _replies[key] = REPLIES.labels(command, f"{key[1]}xx")
    child.inc()
    if code >= 400 and command in REFUSING:
        REJECTIONS.labels(command, f"{code} {esc}" if esc else str(code)).inc()
