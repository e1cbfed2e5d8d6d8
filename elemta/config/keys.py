"""The configuration's keys: for each table a frozen dataclass whose fields are its keys, each
declared once with its type, its default and its rule (key(): a range or the choices), and
the vocabularies they use.  Reading a file is parse.py's."""


from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from elemta import cpus

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
