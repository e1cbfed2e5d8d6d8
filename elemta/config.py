"""Configuration: /etc/elemta/elemta.toml read with tomllib into frozen dataclasses.

Every key has its default here and only here (conf/elemta.toml mirrors it, and a test checks
that the two agree).  Validation is strict: an unknown key, a wrong type or an impossible value
raises ConfigError whose one-line message names the key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from elemta import transport
from elemta.errors import ConfigError

DEFAULT_PATH = "/etc/elemta/elemta.toml"
ROLES = ("mx", "submission", "submissions")
TLS_ROLES = ("submissions",)  # implicit TLS from the first byte (RFC 8314 §3.3), port 465
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

# (minimum, maximum) for numbers; a key absent here may take any value of its type.
_RANGES: dict[str, tuple[float, float]] = {
    "server.max_connections": (1, 1_000_000),
    "server.max_connections_per_ip": (1, 1_000_000),
    "server.grace_period": (0, 3600),
    "server.workers": (1, 15),  # queue IDs carry 4 bits of process number; 15 is delivery's
    "smtp.max_message_size": (1024, 2**40),
    "smtp.max_recipients": (1, 100_000),
    "smtp.max_errors": (1, 10_000),
    "smtp.command_timeout": (1, 3600),
    "smtp.data_timeout": (1, 3600),
    "smtp.greet_pause": (0, 60),
    "smtp.max_received_headers": (1, 1000),
    "smtp.auth_max_failures": (1, 100),
    "smtp.auth_lockout": (0, 86400),
    "tls.reload_interval": (0, 86400),
    "limits.ip_connections_per_minute": (0, 1_000_000),
    "limits.ip_messages_per_hour": (0, 10_000_000),
    "limits.ip_recipients_per_hour": (0, 100_000_000),
    "limits.ip_bytes_per_hour": (0, 2**50),
    "limits.sender_messages_per_hour": (0, 10_000_000),
    "limits.user_messages_per_hour": (0, 10_000_000),
    "limits.user_recipients_per_hour": (0, 100_000_000),
    "limits.max_tracked": (100, 10_000_000),
    "queue.min_free_space": (0, 2**50),
    "queue.max_messages": (0, 2**40),
    "queue.max_bytes": (0, 2**60),
    "queue.batch_max": (1, 100_000),
    "delivery.mx_port": (1, 65535),
    "delivery.concurrency": (1, 1000),
    "delivery.destination_concurrency": (1, 1000),
    "delivery.destination_rate": (0, 100_000),
    "delivery.connect_timeout": (1, 3600),
    "delivery.command_timeout": (1, 3600),
    "delivery.dns_timeout": (0.1, 300),
    "delivery.reuse_idle_timeout": (0, 3600),
    "delivery.reuse_max_messages": (1, 100_000),
    "delivery.retry_first": (1, 86400 * 30),
    "delivery.retry_max": (1, 86400 * 30),
    "delivery.retry_jitter": (0, 1),
    "delivery.max_lifetime": (0, 86400 * 365),
    "delivery.delay_warning": (0, 86400 * 365),
    "delivery.retention": (0, 86400 * 365),
}

TLS_POLICIES = ("none", "may", "encrypt", "verify")
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


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
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    grace_period: float = 30.0
    workers: int = 1  # processes sharing the listeners (SO_REUSEPORT)
    delivery_process: bool = True  # delivery in a process of its own (its own core, crash isolation)
    proxy_networks: tuple[str, ...] = ()  # who may send PROXY headers (HAProxy's addresses)


@dataclass(frozen=True)
class SmtpConfig:
    max_message_size: int = 26_214_400  # 25 MiB; advertised in EHLO SIZE
    max_recipients: int = 100  # RFC 5321 §4.5.3.1.8: at least 100 must be accepted
    max_errors: int = 20  # 5xx replies (unknown commands, bad syntax...) before 421 and close
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: 5 minutes
    data_timeout: float = 180.0  # RFC 5321 §4.5.3.2.5-6: 3 minutes per data block
    greet_pause: float = 0.0  # wait this long before the banner; input in it is refused
    max_received_headers: int = 50  # a message arriving with this many Received headers loops
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    auth_required: bool = True  # submission listeners: AUTH (or a trusted network) before MAIL
    auth_file: str = "/etc/elemta/passwd"  # users and password hashes; see elemtactl user
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")  # CRAM-MD5 needs stored secrets
    auth_max_failures: int = 3  # failed AUTH in one session, then 421 4.7.0 and close
    auth_lockout: float = 300.0  # seconds AUTH is refused to an address after that
    sender_logins: dict = field(default_factory=dict)  # user -> senders it may use ("a@d, @d, *")
    authserv_id: str = ""  # the name in Authentication-Results (RFC 8601 §2.5); "" = hostname


@dataclass(frozen=True)
class Certificate:
    cert_file: str = ""  # PEM chain, leaf first
    key_file: str = ""  # PEM private key; "" = in cert_file


@dataclass(frozen=True)
class TlsConfig:
    certificates: tuple = ()  # [[tls.certificates]]: the first is the default, others by SNI
    min_version: str = "TLSv1.2"
    ciphers: str = ""  # OpenSSL cipher list for TLS 1.2; "" = the system's default
    reload_interval: float = 60.0  # check the files for changes this often; 0 = SIGHUP only


@dataclass(frozen=True)
class LimitsConfig:
    """Flood protection; 0 = no limit.  Clients in smtp.trusted_networks are exempt."""

    ip_connections_per_minute: int = 60
    ip_messages_per_hour: int = 500
    ip_recipients_per_hour: int = 2000
    ip_bytes_per_hour: int = 1_073_741_824
    sender_messages_per_hour: int = 500
    user_messages_per_hour: int = 1000
    user_recipients_per_hour: int = 5000
    max_tracked: int = 100_000  # keys (addresses, senders, users) each limit remembers


@dataclass(frozen=True)
class QueueConfig:
    min_free_space: int = 104_857_600  # refuse mail (452 4.3.1) below 100 MiB free on the spool
    max_messages: int = 0  # refuse mail above this many undelivered messages; 0 = no limit
    max_bytes: int = 0  # ... or above this many bytes of them; 0 = no limit
    batch_max: int = 256  # most messages committed in one group-commit transaction


@dataclass(frozen=True)
class DeliveryConfig:
    hold: bool = False  # keep new mail held in the queue instead of delivering it
    relayhost: str = ""  # host[:port] (IPv6 as [addr]:port) for all outbound mail, no MX lookup; "" = MX
    relayhost_auth_file: str = ""  # file with one line "user:password" for AUTH at the relayhost
    relayhost_tls_policy: str = "may"
    tls_policy: str = "may"  # none | may | encrypt | verify, for MX delivery
    tls_policies: dict = field(default_factory=dict)  # recipient domain -> policy
    ca_file: str = ""  # CA bundle for "verify"; "" = the system's store
    transport: dict = field(default_factory=dict)  # recipient domain -> transport (see docs)
    resolvers: tuple[str, ...] = ()  # "ip" or "ip:port"; () = /etc/resolv.conf
    mx_port: int = 25  # port of MX hosts (tests and unusual setups only)
    dns_timeout: float = 10.0
    helo_name: str = ""  # "" = server.hostname
    concurrency: int = 20  # deliveries in parallel, all destinations together
    destination_concurrency: int = 10  # ... to one destination (one set of MX hosts)
    destination_rate: float = 0.0  # deliveries per second started to one destination; 0 = no cap
    domain_concurrency: dict = field(default_factory=dict)  # recipient domain -> concurrency
    domain_rate: dict = field(default_factory=dict)  # recipient domain -> deliveries per second
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # for each reply, also the one after the data (RFC 5321 §4.5.3.2)
    reuse_idle_timeout: float = 10.0  # keep a connection this long for the next message
    reuse_max_messages: int = 100  # ... and for at most this many messages
    retry_first: float = 300.0  # seconds; see the retry formula in docs/delivery.md
    retry_max: float = 3600.0
    retry_jitter: float = 0.1
    max_lifetime: float = 432_000.0  # 5 days, then the message bounces (0 = first failure)
    delay_warning: float = 14_400.0  # 4 hours: tell the sender mail is delayed; 0 = never
    retention: float = 86_400.0  # keep delivered/failed messages' records this long for trace
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
    timeout: float | None = None  # seconds a call may take in a pool thread; 0 = inline; None = the plugin's default_timeout
    fail_closed: bool = False  # a failed or overrunning call answers 451 4.3.0 (else: skipped)
    max_concurrency: int = 64  # calls in flight at once; more fail at once (as a timeout)
    options: dict = field(default_factory=dict)  # [plugins.options], the plugin's own keys


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


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
}


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


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Check value against the type of its default; return it in the dataclass's type."""
    if path == "tls.certificates":
        return _certificates(value)
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
            return _table(path, value)
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


def _table(path: str, value: dict) -> dict:
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
            raise ConfigError(f"{path}.{key}: expected {want}, got {type(item).__name__} {item!r}")
        # Domains and addresses compare case-insensitively; keys are normalised once, here.
        result[key.lower().rstrip(".")] = item
    return result


def _certificates(raw: Any) -> tuple[Certificate, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("tls.certificates: expected an array of tables [[tls.certificates]]")
    result = []
    for index, item in enumerate(raw):
        path = f"tls.certificates[{index}]"
        if not item.get("cert_file"):
            raise ConfigError(f"{path}.cert_file: missing (the PEM certificate chain)")
        result.append(_section(path, Certificate, item))
    return tuple(result)


_NUMBER_TABLES = {"delivery.domain_concurrency", "delivery.domain_rate"}


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table [{name}], got {type(raw).__name__}")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        path = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"{path}: unknown key (allowed: {', '.join(sorted(known))})")
        values[key] = _coerce(path, value, getattr(defaults, key))
    return cls(**values)


def _plugins(raw: Any) -> tuple[PluginSpec, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("plugins: expected an array of tables [[plugins]]")
    result, names = [], set()
    for index, item in enumerate(raw):
        path = f"plugins[{index}]"
        item = dict(item)
        options = item.pop("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{path}.options: expected a table [plugins.options]")
        if not isinstance(item.get("use"), str) or not item["use"]:
            raise ConfigError(f"{path}.use: missing (a built-in such as \"spf\", or \"module:Class\")")
        timeout = item.pop("timeout", None)  # absent: the plugin class's own default
        if timeout is not None:
            timeout = _coerce(f"{path}.timeout", timeout, 0.0)
        spec = _section(path, PluginSpec, item)
        default_name = spec.use.rpartition(":")[2].lower()  # "pkg.mod:MyCheck" -> "mycheck"
        spec = dataclasses.replace(spec, name=spec.name or default_name, options=options, timeout=timeout)
        for key, (low, high) in (("timeout", (0, 3600)), ("max_concurrency", (1, 100_000))):
            value = getattr(spec, key)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{path}.{key}: {value} is out of range (allowed {low} to {high})")
        if spec.name in names:
            raise ConfigError(f"{path}.name: {spec.name!r} is used twice (give each a name)")
        names.add(spec.name)
        result.append(spec)
    return tuple(result)


def _check_networks(path: str, networks: tuple[str, ...], example: str) -> None:
    for index, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{path}[{index}]: {network!r} is not a network (e.g. {example})") from None


def _listeners(raw: Any) -> tuple[Listener, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("listeners: expected an array of tables [[listeners]]")
    if not raw:
        raise ConfigError("listeners: at least one [[listeners]] table is needed")
    result = []
    for index, item in enumerate(raw):
        if "address" not in item:
            raise ConfigError(f"listeners[{index}].address: missing (e.g. address = \"0.0.0.0:25\")")
        listener = _section(f"listeners[{index}]", Listener, item)
        try:
            split_host_port(listener.address)
        except ValueError as exc:
            raise ConfigError(f"listeners[{index}].address: {listener.address!r}: {exc}") from None
        if listener.role not in ROLES:
            raise ConfigError(
                f"listeners[{index}].role: {listener.role!r} is not a role (allowed: {', '.join(ROLES)})"
            )
        result.append(listener)
    seen = set()
    for listener in result:
        host, port = split_host_port(listener.address)
        key = (host.lower(), port)
        if key in seen:
            raise ConfigError(f"listeners: address {listener.address} is listed twice")
        seen.add(key)
    return tuple(result)


def _check(config: Config) -> None:
    """Checks that need more than one value's type and range."""
    if config.log.level not in LOG_LEVELS:
        raise ConfigError(f"log.level: {config.log.level!r} (allowed: {', '.join(LOG_LEVELS)})")
    if config.log.format not in LOG_FORMATS:
        raise ConfigError(f"log.format: {config.log.format!r} (allowed: {', '.join(LOG_FORMATS)})")
    _check_networks("smtp.trusted_networks", config.smtp.trusted_networks, "192.0.2.0/24")
    for key in ("local_domains", "relay_domains"):
        for index, domain in enumerate(getattr(config.smtp, key)):
            if not domain or domain != domain.strip() or "@" in domain or " " in domain:
                raise ConfigError(f"smtp.{key}[{index}]: {domain!r} is not a domain name")
    if config.delivery.relayhost:
        try:
            transport.split_next_hop(config.delivery.relayhost)
        except ValueError as exc:
            raise ConfigError(f"delivery.relayhost: {exc}") from None
    for path, text in [("local.transport", config.local.transport),
                       *((f"delivery.transport.{k}", v) for k, v in config.delivery.transport.items())]:
        try:
            transport.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: {text!r}: {exc}") from None
    for key, targets in config.local.aliases.items():
        if not targets.strip() or any(not t.strip() or " " in t.strip() for t in targets.split(",")):
            raise ConfigError(f"local.aliases.{key}: expected addresses separated by commas, got {targets!r}")
    d = config.delivery
    for path, policy in [("delivery.tls_policy", d.tls_policy),
                         ("delivery.relayhost_tls_policy", d.relayhost_tls_policy),
                         *((f"delivery.tls_policies.{k}", v) for k, v in d.tls_policies.items())]:
        if policy not in TLS_POLICIES:
            raise ConfigError(f"{path}: {policy!r} is not a TLS policy (allowed: {', '.join(TLS_POLICIES)})")
    for key, count in d.domain_concurrency.items():
        if count != int(count) or count < 1:
            raise ConfigError(f"delivery.domain_concurrency.{key}: expected a whole number of 1 or more")
    if d.retry_max < d.retry_first:
        raise ConfigError("delivery.retry_max: must not be less than delivery.retry_first")
    if d.relayhost_auth_file and not d.relayhost:
        raise ConfigError("delivery.relayhost_auth_file: set delivery.relayhost too")
    _check_networks("server.proxy_networks", config.server.proxy_networks, "192.0.2.10/32")
    for index, listener in enumerate(config.listeners):
        if listener.proxy_protocol and not config.server.proxy_networks:
            raise ConfigError(
                f"listeners[{index}].proxy_protocol: set server.proxy_networks to the proxies' addresses"
            )
        if listener.role in TLS_ROLES and not config.tls.certificates:
            raise ConfigError(
                f"listeners[{index}].role: {listener.role!r} needs a certificate in [[tls.certificates]]"
            )
    if config.tls.min_version not in TLS_VERSIONS:
        raise ConfigError(
            f"tls.min_version: {config.tls.min_version!r} (allowed: {', '.join(TLS_VERSIONS)})"
        )
    for index, mechanism in enumerate(config.smtp.auth_mechanisms):
        if mechanism not in AUTH_MECHANISMS:
            raise ConfigError(
                f"smtp.auth_mechanisms[{index}]: {mechanism!r} (allowed: {', '.join(AUTH_MECHANISMS)})"
            )
    for user, senders in config.smtp.sender_logins.items():
        if not senders.strip() or any(not s.strip() or " " in s.strip() for s in senders.split(",")):
            raise ConfigError(
                f"smtp.sender_logins.{user}: expected addresses, @domains or * separated by commas, "
                f"got {senders!r}"
            )
    if not config.server.spool_dir:
        raise ConfigError("server.spool_dir: must name a directory")
    if not config.server.user:
        raise ConfigError("server.user: must name a user (\"root\" to keep root, not recommended)")


def parse(data: dict, source: str = "") -> Config:
    """Build a Config from parsed TOML (a dict); raise ConfigError naming the bad key."""
    values: dict[str, Any] = {"source": source}
    for key, raw in data.items():
        if key == "listeners":
            values["listeners"] = _listeners(raw)
        elif key == "plugins":
            values["plugins"] = _plugins(raw)
        elif key in _SECTIONS:
            values[key] = _section(key, _SECTIONS[key], raw)
        else:
            allowed = ", ".join(sorted(["listeners", "plugins", *_SECTIONS]))
            raise ConfigError(f"{key}: unknown key (allowed: {allowed})")
    config = Config(**values)
    _check(config)
    # Domains compare case-insensitively; normalise once here, not per recipient.
    smtp = dataclasses.replace(
        config.smtp,
        local_domains=tuple(d.lower().rstrip(".") for d in config.smtp.local_domains),
        relay_domains=tuple(d.lower().rstrip(".") for d in config.smtp.relay_domains),
    )
    return dataclasses.replace(config, smtp=smtp)


def load(path: str) -> Config:
    """Read and check a config file; ConfigError (one line) on any problem."""
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
