"""Configuration: /etc/elemta/elemta.toml read with tomllib into frozen dataclasses.

Every key has its default here and only here (conf/elemta.toml mirrors it, and a test checks
that the two agree).  Validation is strict: an unknown key, a wrong type or an impossible value
is a problem whose one line names the key path and what is allowed.  parse() goes on past a
problem (the key keeps its default, the bad table or listener is left out) and raises one
ConfigError with every problem found, so a file with several mistakes is fixed in one pass.
Checks that relate keys are skipped when one of the keys is itself bad: a made-up second error
would only mislead.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from elemta import cpus, transport
from elemta.errors import ConfigError

DEFAULT_PATH = "/etc/elemta/elemta.toml"
LISTENER_ROLES = ("mx", "submission", "submissions")
TLS_ROLES = ("submissions",)  # implicit TLS from the first byte (RFC 8314 §3.3), port 465
# Mail submission (RFC 6409): AUTH required, the submission rules, reserved connection slots.
SUBMISSION_ROLES = frozenset({"submission", "submissions"})
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
LOG_TARGETS = ("stderr", "syslog", "file")
LOG_FACILITIES = ("mail", "daemon", *(f"local{n}" for n in range(8)))


TLS_POLICIES = ("none", "may", "encrypt", "verify")
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def key(default: Any, *, range: tuple[float, float] | None = None,
        choices: tuple[str, ...] | None = None, what: str = "") -> Any:
    """A config key's default with its rules, declared once beside its type: range (minimum,
    maximum) for a number, or the choices a string may take (what: "a TLS policy", for the
    message).  The checks, and the tests of the man page and conf/elemta.toml, read them
    from the dataclass fields (_RANGES, _CHOICES)."""
    metadata: dict[str, Any] = {}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"], metadata["what"] = choices, what
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Listener:
    address: str = "0.0.0.0:25"  # host:port; IPv6 as [::]:25
    role: str = "mx"  # "mx" (port 25), "submission" (587) or "submissions" (465, implicit TLS)
    proxy_protocol: bool = False  # expect a PROXY v1/v2 header from server.proxy_networks

    @property
    def host(self) -> str:
        return split_host_port(self.address)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.address)[1]


def _default_listeners() -> tuple[Listener, ...]:
    return (Listener("0.0.0.0:25", "mx"), Listener("0.0.0.0:587", "submission"))


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = ""  # name in the banner and Received headers; "" = /etc/mailname, else the FQDN
    spool_dir: str = "/var/spool/elemta"
    maildrop_dir: str = ""  # where sendmail leaves local mail; "" = <spool_dir>-maildrop
    user: str = "elemta"  # started as root: run as this user (only CAP_NET_BIND_SERVICE kept)
    group: str = ""  # ... and this group; "" = the user's primary group
    max_connections: int = key(1000, range=(1, 1_000_000))
    max_connections_per_ip: int = key(20, range=(1, 1_000_000))
    # Of max_connections, kept for trusted networks and submission listeners (at most half):
    # a flood on port 25 cannot lock out the admin's own clients.
    reserved_connections: int = key(100, range=(0, 1_000_000))
    grace_period: float = key(30.0, range=(0, 3600))
    # SMTP processes sharing the listeners (SO_REUSEPORT): "auto" (one per CPU this process
    # may use, see cpus.py) or a number up to 15 (queue IDs carry 4 bits of process number,
    # and 15 is delivery's); worker_count is what it comes to.
    workers: int | str = key("auto", range=(1, 15))
    delivery_process: bool = True  # delivery in a process of its own (its own core, crash isolation)
    proxy_networks: tuple[str, ...] = ()  # who may send PROXY headers (HAProxy's addresses)

    @property
    def worker_count(self) -> int:
        """How many SMTP worker processes run: `workers`, with "auto" worked out now."""
        return cpus.auto_workers() if self.workers == "auto" else int(self.workers)


@dataclass(frozen=True)
class SmtpConfig:
    max_message_size: int = key(26_214_400, range=(1024, 2**40))  # 25 MiB; advertised in EHLO SIZE
    max_recipients: int = key(100, range=(1, 100_000))  # RFC 5321 §4.5.3.1.8: at least 100 must be accepted
    max_errors: int = key(20, range=(1, 10_000))  # 5xx replies (unknown commands, bad syntax...) before 421 and close
    command_timeout: float = key(300.0, range=(1, 3600))  # RFC 5321 §4.5.3.2.7: 5 minutes for a whole command line
    # RFC 5321 §4.5.3.2.5-6: 3 minutes, plus min_data_rate's allowance.
    data_timeout: float = key(180.0, range=(1, 3600))
    # Octets/s a DATA or BDAT transfer must average (as Postfix's smtpd_min_data_rate).
    min_data_rate: int = key(500, range=(0, 1_000_000_000))
    # Under pressure, for untrusted clients that have not authenticated; 0 = never.
    stress_timeout: float = key(10.0, range=(0, 3600))
    greet_pause: float = key(0.0, range=(0, 60))  # wait this long before the banner; input in it is refused
    max_received_headers: int = key(50, range=(1, 1000))  # a message arriving with this many Received headers loops
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    auth_required: bool = True  # submission listeners: AUTH (or a trusted network) before MAIL
    auth_file: str = "/etc/elemta/passwd"  # users and password hashes; see elemtactl user
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")  # CRAM-MD5 needs stored secrets
    auth_max_failures: int = key(3, range=(1, 100))  # failed AUTH in one session, then 421 4.7.0 and close
    auth_lockout: float = key(300.0, range=(0, 86400))  # seconds AUTH is refused to an address after that
    sender_logins: dict = field(default_factory=dict)  # user -> senders it may use ("a@d, @d, *")
    authserv_id: str = ""  # the name in Authentication-Results (RFC 8601 §2.5); "" = hostname


@dataclass(frozen=True)
class Certificate:
    cert_file: str = ""  # PEM chain, leaf first
    key_file: str = ""  # PEM private key; "" = in cert_file


@dataclass(frozen=True)
class TlsConfig:
    certificates: tuple = ()  # [[tls.certificates]]: the first is the default, others by SNI
    min_version: str = key("TLSv1.2", choices=TLS_VERSIONS)
    ciphers: str = ""  # OpenSSL cipher list for TLS 1.2; "" = the system's default
    reload_interval: float = key(60.0, range=(0, 86400))  # check the files for changes this often; 0 = SIGHUP only


@dataclass(frozen=True)
class LimitsConfig:
    """Flood protection; 0 = no limit.  Clients in smtp.trusted_networks are exempt."""

    ip_connections_per_minute: int = key(60, range=(0, 1_000_000))
    ip_messages_per_hour: int = key(500, range=(0, 10_000_000))
    ip_recipients_per_hour: int = key(2000, range=(0, 100_000_000))
    ip_bytes_per_hour: int = key(1_073_741_824, range=(0, 2**50))
    sender_messages_per_hour: int = key(500, range=(0, 10_000_000))
    user_messages_per_hour: int = key(1000, range=(0, 10_000_000))
    user_recipients_per_hour: int = key(5000, range=(0, 100_000_000))
    max_tracked: int = key(100_000, range=(100, 10_000_000))  # keys (addresses, senders, users) each limit remembers


@dataclass(frozen=True)
class QueueConfig:
    min_free_space: int = key(104_857_600, range=(0, 2**50))  # refuse mail (452 4.3.1) below 100 MiB free on the spool
    max_messages: int = key(0, range=(0, 2**40))  # refuse mail above this many undelivered messages; 0 = no limit
    max_bytes: int = key(0, range=(0, 2**60))  # ... or above this many bytes of them; 0 = no limit
    batch_max: int = key(256, range=(1, 100_000))  # most messages committed in one group-commit transaction


@dataclass(frozen=True)
class DeliveryConfig:
    hold: bool = False  # keep new mail held in the queue instead of delivering it
    relayhost: str = ""  # host[:port] (IPv6 as [addr]:port) for all outbound mail, no MX lookup; "" = MX
    relayhost_auth_file: str = ""  # file with one line "user:password" for AUTH at the relayhost
    relayhost_tls_policy: str = key("may", choices=TLS_POLICIES, what="a TLS policy")
    # None | may | encrypt | verify, for MX delivery.
    tls_policy: str = key("may", choices=TLS_POLICIES, what="a TLS policy")
    tls_policies: dict = field(default_factory=dict)  # recipient domain -> policy
    ca_file: str = ""  # CA bundle for "verify"; "" = the system's store
    transport: dict = field(default_factory=dict)  # recipient domain -> transport (see docs)
    resolvers: tuple[str, ...] = ()  # "ip" or "ip:port"; () = /etc/resolv.conf
    mx_port: int = key(25, range=(1, 65535))  # port of MX hosts (tests and unusual setups only)
    dns_timeout: float = key(10.0, range=(0.1, 300))
    helo_name: str = ""  # "" = server.hostname
    # Postfix's defaults (default_process_limit, default_destination_concurrency_limit): one
    # busy destination cannot take every slot, and a queue built up in an outage drains in parallel.
    concurrency: int = key(100, range=(1, 1000))  # deliveries in parallel, all destinations together
    destination_concurrency: int = key(20, range=(1, 1000))  # ... to one destination (one set of MX hosts)
    # Deliveries per second started to one destination; 0 = no cap.
    destination_rate: float = key(0.0, range=(0, 100_000))
    domain_concurrency: dict = field(default_factory=dict)  # recipient domain -> concurrency
    domain_rate: dict = field(default_factory=dict)  # recipient domain -> deliveries per second
    connect_timeout: float = key(30.0, range=(1, 3600))
    # For each reply, also the one after the data (RFC 5321 §4.5.3.2).
    command_timeout: float = key(300.0, range=(1, 3600))
    reuse_idle_timeout: float = key(10.0, range=(0, 3600))  # keep a connection this long for the next message
    reuse_max_messages: int = key(100, range=(1, 100_000))  # ... and for at most this many messages
    retry_first: float = key(300.0, range=(1, 86400 * 30))  # seconds; see the retry formula in docs/delivery.md
    retry_max: float = key(3600.0, range=(1, 86400 * 30))
    retry_jitter: float = key(0.1, range=(0, 1))
    max_lifetime: float = key(432_000.0, range=(0, 86400 * 365))  # 5 days, then the message bounces (0 = first failure)
    delay_warning: float = key(14_400.0, range=(0, 86400 * 365))  # 4 hours: tell the sender mail is delayed; 0 = never
    # Keep delivered/failed messages' records this long for trace.
    retention: float = key(86_400.0, range=(0, 86400 * 365))
    double_bounce_to: str = ""  # where undeliverable bounces go; "" = log them only


@dataclass(frozen=True)
class LocalConfig:
    transport: str = "lmtp:unix:/run/dovecot/lmtp"  # how mail for smtp.local_domains is delivered
    recipients: tuple[str, ...] = ()  # valid local addresses; "@domain" = all of it; () = all
    recipients_file: str = ""  # more of them, one per line
    aliases: dict = field(default_factory=dict)  # "abuse@d" or "abuse" -> "a@d, b@d"; "@d" = catch-all
    postmaster: str = ""  # where postmaster@ of every local domain goes; "" = postmaster@<domain>


@dataclass(frozen=True)
class PluginSpec:
    """One [[plugins]] table; the plugin's own options are checked when it is loaded."""

    use: str = ""  # a built-in (spf, dkim, ...), "package.module:Class", or an entry point's name
    name: str = ""  # in logs, statistics and elemtactl plugins; "" = use (its class, lower case)
    enabled: bool = True
    # Seconds a call may take in a pool thread; 0 = inline; None = the plugin's default_timeout.
    timeout: float | None = None
    fail_closed: bool = False  # a failed or overrunning call answers 451 4.3.0 (else: skipped)
    max_concurrency: int = 64  # calls in flight at once; more fail at once (as a timeout)
    options: dict = field(default_factory=dict)  # [plugins.options], the plugin's own keys


@dataclass(frozen=True)
class MonitorConfig:
    """The HTTP endpoint for monitoring: /metrics (Prometheus), /healthz, /readyz."""

    listen: tuple[str, ...] = ("127.0.0.1:9525",)  # host:port each; [] or "" = no endpoint
    metrics_dir: str = ""  # the processes' counter files; "" = $RUNTIME_DIRECTORY/metrics, else under /dev/shm
    max_connections: int = key(16, range=(1, 10_000))  # HTTP connections open at once; more are closed at once
    timeout: float = key(10.0, range=(1, 3600))  # seconds a request may take to arrive, and its answer to go out


@dataclass(frozen=True)
class LogConfig:
    level: str = key("info", choices=LOG_LEVELS)
    format: str = key("text", choices=LOG_FORMATS)
    # "stderr" (the journal under systemd), "syslog" (/dev/log) or "file".
    target: str = key("stderr", choices=LOG_TARGETS)
    file: str = ""  # target "file": this file, reopened on SIGHUP and SIGUSR1 (logrotate)
    facility: str = key("mail", choices=LOG_FACILITIES)  # target "syslog": mail (as MTAs), daemon or local0-local7


@dataclass(frozen=True)
class Config:
    listeners: tuple[Listener, ...] = field(default_factory=_default_listeners)
    server: ServerConfig = field(default_factory=ServerConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    plugins: tuple[PluginSpec, ...] = ()  # [[plugins]], called in this order
    # Not a TOML key: set by `elemta --dev`, which accepts every recipient (open relay on
    # loopback) so a developer can send anything and read it back from the queue.
    dev: bool = False
    source: str = ""  # the file this was read from, for messages

    @property
    def queue_path(self) -> str:
        return os.path.join(self.server.spool_dir, "queue.db")

    @property
    def maildrop_path(self) -> str:
        return self.server.maildrop_dir or self.server.spool_dir.rstrip("/") + "-maildrop"

    @property
    def hostname(self) -> str:
        return self.server.hostname or mailname() or socket.getfqdn()


MAILNAME = "/etc/mailname"


def mailname(path: str = MAILNAME) -> str:
    """The mail name Debian keeps in /etc/mailname (its first line), or "" if there is none."""
    try:
        with open(path, encoding="ascii") as handle:
            name = handle.readline().strip().rstrip(".")
    except (OSError, UnicodeDecodeError):
        return ""
    return name if name and " " not in name else ""


_SECTIONS = {
    "server": ServerConfig,
    "smtp": SmtpConfig,
    "tls": TlsConfig,
    "limits": LimitsConfig,
    "queue": QueueConfig,
    "delivery": DeliveryConfig,
    "local": LocalConfig,
    "log": LogConfig,
    "monitor": MonitorConfig,
}


def _rules(rule: str) -> dict[str, Any]:
    """"section.key" -> the key's rule (range or choices) as its field declares it."""
    return {f"{name}.{f.name}": f.metadata[rule]
            for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls) if rule in f.metadata}


_RANGES: dict[str, tuple[float, float]] = _rules("range")  # (minimum, maximum) of a number
_CHOICES: dict[str, tuple[str, ...]] = _rules("choices")  # what a string key may be
_WHAT: dict[str, str] = _rules("what")


class _Problems:
    """The problems found so far, and the key paths they are about."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.paths: set[str] = set()

    def add(self, path: str, message: str) -> None:
        self.lines.append(message)
        self.paths.add(path)

    def bad(self, *paths: str) -> bool:
        """True if a problem was found at one of paths or inside it."""
        return any(p == path or p.startswith((path + ".", path + "[")) for p in self.paths for path in paths)

    def trying(self, path: str):
        """A context in which a ConfigError (one problem or several) is recorded, not raised."""
        return _Trying(self, path)


class _Trying:
    def __init__(self, problems: _Problems, path: str) -> None:
        self.problems, self.path = problems, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, ConfigError):
            for line in exc.problems:
                self.problems.add(self.path, line)
            return True
        return False


def split_host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:25' / '[::1]:25' / 'mail.example:25' -> (host, port); ValueError if bad."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            raise ValueError("IPv6 addresses are written [addr]:port")
    else:
        host, sep, port = address.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected host:port (IPv6 as [addr]:port)")
    # Port 0 binds any free port: tests use it; elemta prints the port it got.
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError("expected host:port with a port from 0 to 65535")
    return host, int(port)


def _type_name(tp: Any) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        tuple: "a list of strings",
        dict: "a table",
    }[tp]


def _coerce(path: str, value: Any, default: Any, problems: _Problems) -> Any:
    """Check value against the type of its default; return it in the dataclass's type.
    ConfigError for a bad value; a table or the certificates record their entries' problems
    in problems and keep the good entries, so the checks of those still run."""
    if path == "tls.certificates":
        return _certificates(value, problems)
    if path == "monitor.listen" and isinstance(value, str):  # one address, or "" for none
        value = [value] if value else []
    if path == "server.workers":
        if value == "auto":
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f'{path}: expected "auto" or an integer, got {type(value).__name__} {value!r}')
        default = 1
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif kind is dict:
        ok = isinstance(value, dict)
        if ok:
            return _table(path, value, problems)
    else:
        ok = isinstance(value, str)
    if not ok:
        got = type(value).__name__
        raise ConfigError(f"{path}: expected {_type_name(kind)}, got {got} {value!r}")
    if path in _RANGES:
        low, high = _RANGES[path]
        if not low <= value <= high:
            raise ConfigError(f"{path}: {value} is out of range (allowed {_number(low)} to {_number(high)})")
    return value


def _table(path: str, value: dict, problems: _Problems) -> dict:
    """A table of domain or address keys; values are strings, or numbers for the rate tables."""
    number = path in _NUMBER_TABLES
    result = {}
    for key, item in value.items():
        good = (
            isinstance(item, (int, float)) and not isinstance(item, bool) and item >= 0
            if number else isinstance(item, str)
        )
        if not good:
            want = "a number of 0 or more" if number else "a string"
            problems.add(f"{path}.{key}", f"{path}.{key}: expected {want}, got {type(item).__name__} {item!r}")
            continue
        # Domains and addresses compare case-insensitively; keys are normalised once, here.
        result[key.lower().rstrip(".")] = item
    return result


def _certificates(raw: Any, problems: _Problems) -> tuple[Certificate, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("tls.certificates: expected an array of tables [[tls.certificates]]")
    result = []
    for index, item in enumerate(raw):
        path = f"tls.certificates[{index}]"
        if not item.get("cert_file"):
            problems.add(path, f"{path}.cert_file: missing (the PEM certificate chain)")
            continue
        result.append(_section(path, Certificate, item, problems))
    return tuple(result)


_NUMBER_TABLES = {"delivery.domain_concurrency", "delivery.domain_rate"}


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _section(name: str, cls: type, raw: Any, problems: _Problems) -> Any:
    """The dataclass of a table; a bad key is a problem and keeps its default."""
    if not isinstance(raw, dict):
        problems.add(name, f"{name}: expected a table [{name}], got {type(raw).__name__}")
        return cls()
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        path = f"{name}.{key}"
        if key not in known:
            problems.add(path, f"{path}: unknown key (allowed: {', '.join(sorted(known))})")
            continue
        with problems.trying(path):
            values[key] = _coerce(path, value, getattr(defaults, key), problems)
    return cls(**values)


def _plugins(raw: Any, problems: _Problems) -> tuple[PluginSpec, ...]:
    """The [[plugins]]; one with a problem is left out (and the file refused)."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        problems.add("plugins", "plugins: expected an array of tables [[plugins]]")
        return ()
    result, names = [], set()
    for index, item in enumerate(raw):
        path = f"plugins[{index}]"
        before = len(problems.lines)
        item = dict(item)
        options = item.pop("options", {})
        if not isinstance(options, dict):
            problems.add(path, f"{path}.options: expected a table [plugins.options]")
        if not isinstance(item.get("use"), str) or not item["use"]:
            problems.add(path, f"{path}.use: missing (a built-in such as \"spf\", or \"module:Class\")")
            continue
        timeout = item.pop("timeout", None)  # absent: the plugin class's own default
        if timeout is not None:
            with problems.trying(f"{path}.timeout"):
                timeout = _coerce(f"{path}.timeout", timeout, 0.0, problems)
        spec = _section(path, PluginSpec, item, problems)
        if len(problems.lines) > before:
            continue
        default_name = spec.use.rpartition(":")[2].lower()  # "pkg.mod:MyCheck" -> "mycheck"
        spec = dataclasses.replace(spec, name=spec.name or default_name, options=options, timeout=timeout)
        for key, (low, high) in (("timeout", (0, 3600)), ("max_concurrency", (1, 100_000))):
            value = getattr(spec, key)
            if value is not None and not low <= value <= high:
                problems.add(path, f"{path}.{key}: {value} is out of range (allowed {low} to {high})")
        if spec.name in names:
            problems.add(path, f"{path}.name: {spec.name!r} is used twice (give each a name)")
        names.add(spec.name)
        result.append(spec)
    return tuple(result)


def _check_networks(path: str, networks: tuple[str, ...], example: str, problems: _Problems) -> None:
    for index, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.add(path, f"{path}[{index}]: {network!r} is not a network (e.g. {example})")


def _listeners(raw: Any, problems: _Problems) -> tuple[Listener, ...]:
    """The [[listeners]]; a bad one is left out (and the file refused)."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        problems.add("listeners", "listeners: expected an array of tables [[listeners]]")
        return _default_listeners()
    if not raw:
        problems.add("listeners", "listeners: at least one [[listeners]] table is needed")
        return _default_listeners()
    result, addresses = [], []
    for index, item in enumerate(raw):
        path = f"listeners[{index}]"
        if "address" not in item:
            problems.add(path, f"{path}.address: missing (e.g. address = \"0.0.0.0:25\")")
            continue
        before = len(problems.lines)
        listener = _section(path, Listener, item, problems)
        try:
            split_host_port(listener.address)
        except ValueError as exc:
            problems.add(path, f"{path}.address: {listener.address!r}: {exc}")
        if listener.role not in LISTENER_ROLES:
            problems.add(path, f"{path}.role: {listener.role!r} is not a role (allowed: {', '.join(LISTENER_ROLES)})")
        if len(problems.lines) == before:
            result.append(listener)
        if not problems.bad(f"{path}.address"):
            addresses.append(listener.address)  # a listener bad otherwise can still be a duplicate
    seen = set()
    for address in addresses:
        try:
            host, port = split_host_port(address)
        except ValueError:
            continue  # reported above
        key = (host.lower(), port)
        if key in seen:
            problems.add("listeners", f"listeners: address {address} is listed twice")
        seen.add(key)
    return tuple(result)


def _check(config: Config, problems: _Problems) -> None:
    """Checks that need more than one value's type and range; each adds its problem and the
    next one runs.  A check relating two keys is skipped if either is already a problem (its
    value is then the default, not what the file says)."""
    add = problems.add
    for path, allowed in _CHOICES.items():
        section, name = path.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            what = f" is not {_WHAT[path]}" if _WHAT[path] else ""
            add(path, f"{path}: {value!r}{what} (allowed: {', '.join(allowed)})")
    if config.log.target == "file" and not os.path.isabs(config.log.file):
        add("log.file", f"log.file: {config.log.file!r}: target \"file\" needs an absolute path")
    _check_networks("smtp.trusted_networks", config.smtp.trusted_networks, "192.0.2.0/24", problems)
    for key in ("local_domains", "relay_domains"):
        for index, domain in enumerate(getattr(config.smtp, key)):
            if not domain or domain != domain.strip() or "@" in domain or " " in domain:
                add(f"smtp.{key}", f"smtp.{key}[{index}]: {domain!r} is not a domain name")
    if config.delivery.relayhost:
        try:
            transport.split_next_hop(config.delivery.relayhost)
        except ValueError as exc:
            add("delivery.relayhost", f"delivery.relayhost: {exc}")
    for path, text in [("local.transport", config.local.transport),
                       *((f"delivery.transport.{k}", v) for k, v in config.delivery.transport.items())]:
        try:
            transport.parse(text)
        except ValueError as exc:
            add(path, f"{path}: {text!r}: {exc}")
    for key, targets in config.local.aliases.items():
        if not targets.strip() or any(not t.strip() or " " in t.strip() for t in targets.split(",")):
            add("local.aliases", f"local.aliases.{key}: expected addresses separated by commas, got {targets!r}")
    d = config.delivery
    for path, policy in ((f"delivery.tls_policies.{k}", v) for k, v in d.tls_policies.items()):
        if policy not in TLS_POLICIES:
            add(path, f"{path}: {policy!r} is not a TLS policy (allowed: {', '.join(TLS_POLICIES)})")
    for key, count in d.domain_concurrency.items():
        if count != int(count) or count < 1:
            add("delivery.domain_concurrency",
                f"delivery.domain_concurrency.{key}: expected a whole number of 1 or more")
    if d.retry_max < d.retry_first and not problems.bad("delivery.retry_max", "delivery.retry_first"):
        add("delivery.retry_max", "delivery.retry_max: must not be less than delivery.retry_first")
    if d.relayhost_auth_file and not d.relayhost and not problems.bad("delivery.relayhost"):
        add("delivery.relayhost_auth_file", "delivery.relayhost_auth_file: set delivery.relayhost too")
    _check_networks("server.proxy_networks", config.server.proxy_networks, "192.0.2.10/32", problems)
    # Indexes name the file's [[listeners]]: only right when none was left out.
    if not problems.bad("listeners"):
        for index, listener in enumerate(config.listeners):
            if (listener.proxy_protocol and not config.server.proxy_networks
                    and not problems.bad("server.proxy_networks")):
                add(f"listeners[{index}]",
                    f"listeners[{index}].proxy_protocol: set server.proxy_networks to the proxies' addresses")
            if listener.role in TLS_ROLES and not config.tls.certificates and not problems.bad("tls.certificates"):
                add(f"listeners[{index}]",
                    f"listeners[{index}].role: {listener.role!r} needs a certificate in [[tls.certificates]]")
    for index, mechanism in enumerate(config.smtp.auth_mechanisms):
        if mechanism not in AUTH_MECHANISMS:
            add("smtp.auth_mechanisms",
                f"smtp.auth_mechanisms[{index}]: {mechanism!r} (allowed: {', '.join(AUTH_MECHANISMS)})")
    for user, senders in config.smtp.sender_logins.items():
        if not senders.strip() or any(not s.strip() or " " in s.strip() for s in senders.split(",")):
            add("smtp.sender_logins",
                f"smtp.sender_logins.{user}: expected addresses, @domains or * separated by commas, "
                f"got {senders!r}")
    _check_monitor(config, problems)
    if not config.server.spool_dir:
        add("server.spool_dir", "server.spool_dir: must name a directory")
    if not config.server.user:
        add("server.user", "server.user: must name a user (\"root\" to keep root, not recommended)")


def _check_monitor(config: Config, problems: _Problems) -> None:
    smtp = set()
    if not problems.bad("listeners"):
        smtp = {split_host_port(listener.address) for listener in config.listeners}
    seen = set()
    for index, address in enumerate(config.monitor.listen):
        path = f"monitor.listen[{index}]"
        try:
            host, port = split_host_port(address)
        except ValueError as exc:
            problems.add("monitor.listen", f"{path}: {address!r}: {exc}")
            continue
        if port and ((host, port) in smtp or (host, port) in seen):
            problems.add("monitor.listen", f"{path}: {address} is also an SMTP listener or listed twice")
        seen.add((host, port))


def parse(data: dict, source: str = "") -> Config:
    """Build a Config from parsed TOML (a dict); ConfigError with every problem found, one
    line each, in the file's order and then the cross-key checks'."""
    problems = _Problems()
    values: dict[str, Any] = {"source": source}
    for key, raw in data.items():
        if key == "listeners":
            values["listeners"] = _listeners(raw, problems)
        elif key == "plugins":
            values["plugins"] = _plugins(raw, problems)
        elif key in _SECTIONS:
            values[key] = _section(key, _SECTIONS[key], raw, problems)
        else:
            allowed = ", ".join(sorted(["listeners", "plugins", *_SECTIONS]))
            problems.add(key, f"{key}: unknown key (allowed: {allowed})")
    config = Config(**values)
    _check(config, problems)
    if problems.lines:
        raise ConfigError(*problems.lines)
    # Domains compare case-insensitively; normalise once here, not per recipient.
    smtp = dataclasses.replace(
        config.smtp,
        local_domains=tuple(d.lower().rstrip(".") for d in config.smtp.local_domains),
        relay_domains=tuple(d.lower().rstrip(".") for d in config.smtp.relay_domains),
    )
    return dataclasses.replace(config, smtp=smtp)


def load(path: str) -> Config:
    """Read and check a config file; ConfigError (one line per problem) on any problem."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (use --config FILE, or --dev)") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, source=path)


def replace(config: Config, **sections: dict) -> Config:
    """Return config with some keys of some sections replaced: replace(c, smtp={...})."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **keys) for name, keys in sections.items()
    }
    return dataclasses.replace(config, **changes)
