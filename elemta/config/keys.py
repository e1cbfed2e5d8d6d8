"""The configuration's keys: for each table a frozen dataclass whose fields are its keys, each
declared once with key(): its type, its default, its one-line doc and its rule (a range or the
choices, or required), and the vocabularies they use.  Reading a file is parse.py's."""


from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
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


# What one connection does (the client's), and what a destination may ask for: the others look
# at what the recipient domain publishes (delivery/tls_decision.py).
TLS_POLICIES = ("none", "may", "encrypt", "verify")
RELAYHOST_TLS_POLICIES = (*TLS_POLICIES, "dane", "dane-only")
DESTINATION_TLS_POLICIES = (*RELAYHOST_TLS_POLICIES, "mta-sts")
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def key(default: Any = dataclasses.MISSING, *, doc: str, factory: Callable[[], Any] | None = None,
        range: tuple[float, float] | None = None, choices: tuple[str, ...] | None = None, what: str = "",
        required: bool = False) -> Any:
    """A config key, declared once beside its type: its default (or the factory of a table or
    list default), its one-line doc, and its rules: range (minimum, maximum) for a number, the
    choices a string may take (what: "a TLS policy", for the message), or required (an entry
    of an array of tables must set it).  The checks, `elemtactl config show` and the tests of
    the man page and conf/elemta.toml read them from the dataclass field's metadata."""
    metadata: dict[str, Any] = {"doc": doc}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"], metadata["what"] = choices, what
    if required:
        metadata["required"] = True
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Listener:
    address: str = key("0.0.0.0:25", required=True,
                       doc='host:port to listen on; IPv6 as "[::]:25"; port 0 takes any free port')
    role: str = key("mx", choices=LISTENER_ROLES, what="a role",
                    doc='"mx" (port 25), "submission" (587) or "submissions" (465, implicit TLS)')
    proxy_protocol: bool = key(False, doc="expect a PROXY v1/v2 header first, from server.proxy_networks only")

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
    hostname: str = key("", doc='name in the banner and Received headers; "" = /etc/mailname, else the FQDN')
    spool_dir: str = key("/var/spool/elemta", doc="directory of the queue database (queue.db); needs a restart")
    maildrop_dir: str = key("", doc='where sendmail leaves local mail; "" = <spool_dir>-maildrop')
    user: str = key("elemta", doc="started as root: run as this user, keeping only CAP_NET_BIND_SERVICE")
    group: str = key("", doc='the group to run as; "" = the user\'s primary group')
    max_connections: int = key(1000, range=(1, 1_000_000), doc="most SMTP connections open at once, over all listeners")
    max_connections_per_ip: int = key(20, range=(1, 1_000_000),
                                      doc="most SMTP connections open at once from one client address")
    # A flood on port 25 cannot lock out the admin's own clients.
    reserved_connections: int = key(100, range=(0, 1_000_000),
                                    doc="of max_connections, kept for trusted networks and submission (at most half)")
    grace_period: float = key(30.0, range=(0, 3600), doc="seconds open sessions may run on after SIGTERM; then 421")
    # Up to 15: queue IDs carry 4 bits of process number, and 15 is delivery's.  worker_count
    # is what "auto" comes to (cpus.py).
    workers: int | str = key("auto", range=(1, 15),
                             doc='SMTP processes sharing the listeners (SO_REUSEPORT); "auto" = one per CPU usable')
    delivery_process: bool = key(True, doc="deliver in a process of its own (its own core, crash isolation)")
    proxy_networks: tuple[str, ...] = key((), doc="who may send PROXY headers (the proxies' addresses)")

    @property
    def worker_count(self) -> int:
        """How many SMTP worker processes run: `workers`, with "auto" worked out now."""
        return cpus.auto_workers() if self.workers == "auto" else int(self.workers)


@dataclass(frozen=True)
class SmtpConfig:
    max_message_size: int = key(26_214_400, range=(1024, 2**40),
                                doc="largest message in octets, advertised in EHLO SIZE")
    # RFC 5321 §4.5.3.1.8: at least 100 must be accepted.
    max_recipients: int = key(100, range=(1, 100_000), doc="most recipients per message; more get 452 4.5.3")
    max_errors: int = key(20, range=(1, 10_000),
                          doc="5xx replies (unknown commands, bad syntax...) before 421 and close")
    # RFC 5321 §4.5.3.2.7: 5 minutes.
    command_timeout: float = key(300.0, range=(1, 3600), doc="seconds a whole command line may take")
    # RFC 5321 §4.5.3.2.5-6: 3 minutes, plus min_data_rate's allowance.
    data_timeout: float = key(180.0, range=(1, 3600),
                              doc="seconds of silence in DATA or BDAT text; also the whole transfer's allowance")
    # As Postfix's smtpd_min_data_rate: a client dripping the text cannot hold a slot for ever.
    min_data_rate: int = key(500, range=(0, 1_000_000_000),
                             doc="octets/s a DATA or BDAT transfer must average beyond data_timeout")
    stress_timeout: float = key(10.0, range=(0, 3600),
                                doc="under stress, seconds per command for untrusted, anonymous clients; 0 = never")
    greet_pause: float = key(0.0, range=(0, 60),
                             doc="seconds to wait before the banner; a client that talks first is refused")
    max_received_headers: int = key(50, range=(1, 1000),
                                    doc="a message arriving with this many Received headers loops (554 5.4.6)")
    local_domains: tuple[str, ...] = key((), doc='domains whose mail this host takes on "mx" listeners')
    relay_domains: tuple[str, ...] = key(
        (), doc='further domains "mx" listeners accept mail for; ".example.org" covers its subdomains')
    trusted_networks: tuple[str, ...] = key(("127.0.0.0/8", "::1/128"),
                                            doc="client networks that may relay anywhere and skip auth_required")
    auth_required: bool = key(True, doc="submission listeners: AUTH (or a trusted network) before MAIL")
    auth_file: str = key("/etc/elemta/passwd", doc="users and password hashes; see elemtactl user")
    # CRAM-MD5 needs secrets stored password-equivalent.
    auth_mechanisms: tuple[str, ...] = key(("PLAIN", "LOGIN"),
                                           doc='SASL mechanisms offered, of "PLAIN", "LOGIN" and "CRAM-MD5"')
    auth_max_failures: int = key(3, range=(1, 100), doc="failed AUTH in one session, then 421 4.7.0 and close")
    auth_lockout: float = key(300.0, range=(0, 86400), doc="seconds AUTH is refused to an address after that")
    sender_logins: dict = key(factory=dict, doc='user -> the senders it may use ("a@d, @d, *")')
    # RFC 8601 §2.5.
    authserv_id: str = key("", doc='the name in Authentication-Results; "" = server.hostname')


@dataclass(frozen=True)
class Certificate:
    cert_file: str = key("", required=True, doc="PEM certificate chain, leaf first")
    key_file: str = key("", doc='PEM private key; "" = in cert_file')


@dataclass(frozen=True)
class TlsConfig:
    certificates: tuple = key((), doc="the certificates, a table each: the first is the default, others chosen by SNI")
    min_version: str = key("TLSv1.2", choices=TLS_VERSIONS, doc="lowest TLS version accepted")
    ciphers: str = key("", doc='OpenSSL cipher list for TLS 1.2; "" = forward-secret AEAD suites only')
    reload_interval: float = key(60.0, range=(0, 86400),
                                 doc="seconds between checks of the certificate files; 0 = SIGHUP only")


@dataclass(frozen=True)
class LimitsConfig:
    """Flood protection; 0 = no limit.  Clients in smtp.trusted_networks are exempt."""

    ip_connections_per_minute: int = key(60, range=(0, 1_000_000),
                                         doc="new connections per minute from one client address")
    ip_messages_per_hour: int = key(500, range=(0, 10_000_000), doc="messages per hour from one client address")
    ip_recipients_per_hour: int = key(2000, range=(0, 100_000_000), doc="recipients per hour from one client address")
    ip_bytes_per_hour: int = key(1_073_741_824, range=(0, 2**50), doc="message bytes per hour from one client address")
    sender_messages_per_hour: int = key(500, range=(0, 10_000_000),
                                        doc="messages per hour with one envelope sender, unauthenticated clients")
    user_messages_per_hour: int = key(1000, range=(0, 10_000_000), doc="messages per hour from one authenticated user")
    user_recipients_per_hour: int = key(5000, range=(0, 100_000_000),
                                        doc="recipients per hour from one authenticated user")
    max_tracked: int = key(100_000, range=(100, 10_000_000),
                           doc="keys (addresses, senders, users) each limit remembers; the oldest go first")


@dataclass(frozen=True)
class QueueConfig:
    min_free_space: int = key(104_857_600, range=(0, 2**50),
                              doc="refuse mail (452 4.3.1) below this many bytes free on the spool")
    max_messages: int = key(0, range=(0, 2**40), doc="refuse mail above this many undelivered messages; 0 = no limit")
    max_bytes: int = key(0, range=(0, 2**60),
                         doc="refuse mail above this many bytes of undelivered messages; 0 = no limit")
    batch_max: int = key(256, range=(1, 100_000), doc="most messages committed in one group-commit transaction")


@dataclass(frozen=True)
class DeliveryConfig:
    hold: bool = key(False, doc="keep new mail held in the queue instead of delivering it")
    relayhost: str = key("", doc='host[:port] (IPv6 as [addr]:port) for all outbound mail, no MX lookup; "" = MX')
    relayhost_auth_file: str = key("", doc='file with one line "user:password" for AUTH at the relayhost')
    relayhost_tls_policy: str = key("may", choices=RELAYHOST_TLS_POLICIES, what="a TLS policy",
                                    doc="TLS to the relayhost")
    tls_policy: str = key("dane", choices=DESTINATION_TLS_POLICIES, what="a TLS policy",
                          doc="TLS for delivery to a recipient domain (MX or transport)")
    tls_policies: dict = key(factory=dict, doc="recipient domain -> TLS policy, overriding tls_policy")
    ca_file: str = key("", doc='CA bundle for "verify"; "" = the system\'s store')
    mta_sts: bool = key(True, doc="apply the MTA-STS policy a domain publishes to MX delivery (RFC 8461)")
    dane: bool = key(True, doc="DANE (RFC 7672) for hosts with authenticated TLSA records (local resolvers only)")
    tls_reports: bool = key(True, doc="count TLS sessions per recipient domain and send daily TLS reports (RFC 8460)")
    transport: dict = key(factory=dict, doc="recipient domain -> transport, instead of the MX records")
    resolvers: tuple[str, ...] = key((), doc='DNS servers, "ip" or "ip:port"; [] = /etc/resolv.conf')
    mx_port: int = key(25, range=(1, 65535), doc="port of MX hosts (tests and unusual setups only)")
    dns_timeout: float = key(10.0, range=(0.1, 300), doc="seconds one DNS lookup may take, every server and retry")
    helo_name: str = key("", doc='name sent in EHLO/LHLO; "" = server.hostname')
    # Postfix's defaults (default_process_limit, default_destination_concurrency_limit): one
    # busy destination cannot take every slot, and a queue built up in an outage drains in parallel.
    concurrency: int = key(100, range=(1, 1000), doc="deliveries in parallel, all destinations together")
    destination_concurrency: int = key(20, range=(1, 1000),
                                       doc="deliveries in parallel to one destination (one set of MX hosts)")
    destination_rate: float = key(0.0, range=(0, 100_000),
                                  doc="deliveries per second started to one destination; 0 = no cap")
    domain_concurrency: dict = key(factory=dict, doc="recipient domain -> destination_concurrency")
    domain_rate: dict = key(factory=dict, doc="recipient domain -> destination_rate (deliveries per second)")
    connect_timeout: float = key(30.0, range=(1, 3600), doc="seconds to wait for a TCP connection to one address")
    # RFC 5321 §4.5.3.2.
    command_timeout: float = key(300.0, range=(1, 3600), doc="seconds to wait for each reply, that after the data too")
    reuse_idle_timeout: float = key(10.0, range=(0, 3600),
                                    doc="seconds an idle connection is kept for the next message; 0 = no reuse")
    reuse_max_messages: int = key(100, range=(1, 100_000), doc="most messages sent over one connection")
    # The retry formula is in docs/delivery.md.
    retry_first: float = key(300.0, range=(1, 86400 * 30), doc="seconds, the first retry delay")
    retry_max: float = key(3600.0, range=(1, 86400 * 30), doc="seconds, the longest retry delay")
    retry_jitter: float = key(0.1, range=(0, 1), doc="fraction each retry delay is spread by at random")
    max_lifetime: float = key(432_000.0, range=(0, 86400 * 365),
                              doc="seconds after arrival when undelivered mail bounces; 0 = at the first failure")
    delay_warning: float = key(14_400.0, range=(0, 86400 * 365),
                               doc="seconds after arrival when the sender is told mail is delayed; 0 = never")
    retention: float = key(86_400.0, range=(0, 86400 * 365),
                           doc="seconds the records of a delivered or failed message are kept for trace")
    double_bounce_to: str = key("", doc='where undeliverable bounces go; "" = log them only')


@dataclass(frozen=True)
class LocalConfig:
    transport: str = key("lmtp:unix:/run/dovecot/lmtp", doc="how mail for smtp.local_domains is delivered")
    recipients: tuple[str, ...] = key((), doc='valid local addresses; "@domain" = all of it; [] = all')
    recipients_file: str = key("", doc="more valid local addresses, one per line")
    aliases: dict = key(factory=dict, doc='"abuse@d" or "abuse" -> "a@d, b@d"; "@d" = catch-all')
    postmaster: str = key("", doc='where postmaster@ of every local domain goes; "" = postmaster@<domain>')


@dataclass(frozen=True)
class PluginSpec:
    """One [[plugins]] table; the plugin's own options are checked when it is loaded."""

    use: str = key("", required=True,
                   doc='a built-in ("spf", "dkim", ...), "package.module:Class", or an entry point\'s name')
    name: str = key("", doc='in logs, statistics and elemtactl plugins; "" = use (its class, lower case)')
    enabled: bool = key(True, doc="false keeps the table but loads nothing")
    # None (not set) is the plugin class's default_timeout.
    timeout: float | None = key(None, range=(0, 3600),
                                doc="seconds a call may take in a pool thread; 0 = in the caller's thread")
    fail_closed: bool = key(False, doc="a failed or overrunning call answers 451 4.3.0 (else it is skipped)")
    max_concurrency: int = key(64, range=(1, 100_000), doc="calls in flight at once; more fail at once (as a timeout)")
    options: dict = key(factory=dict, doc="the plugin's own keys, checked when it is loaded")


@dataclass(frozen=True)
class MonitorConfig:
    """The HTTP endpoint for monitoring: /metrics (Prometheus), /healthz, /readyz."""

    listen: tuple[str, ...] = key(("127.0.0.1:9525",), doc='host:port of the HTTP endpoint, each; [] or "" = none')
    metrics_dir: str = key(
        "", doc='the processes\' counter files; "" = $RUNTIME_DIRECTORY/metrics, else under /dev/shm')
    max_connections: int = key(16, range=(1, 10_000), doc="HTTP connections open at once; more are closed at once")
    timeout: float = key(10.0, range=(1, 3600), doc="seconds a request may take to arrive, and its answer to go out")


@dataclass(frozen=True)
class LogConfig:
    level: str = key("info", choices=LOG_LEVELS, doc='lowest level logged: "debug", "info", "warning" or "error"')
    format: str = key("text", choices=LOG_FORMATS, doc='"text" (key=value) or "json" (an object a line)')
    target: str = key("stderr", choices=LOG_TARGETS,
                      doc='"stderr" (the journal under systemd), "syslog" (/dev/log) or "file"')
    file: str = key("", doc='target "file": this file, reopened on SIGHUP and SIGUSR1 (logrotate)')
    # mail: where MTAs log, and where fail2ban and logwatch look.
    facility: str = key("mail", choices=LOG_FACILITIES, doc='target "syslog": "mail", "daemon" or "local0" to "local7"')


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


# Every table of the file by its TOML name, those of the arrays of tables included, in the
# order of conf/elemta.toml.
_TABLES = {"listeners": Listener, **_SECTIONS, "tls.certificates": Certificate, "plugins": PluginSpec}


def _rules(rule: str, tables: dict[str, type]) -> dict[str, Any]:
    """"table.key" -> the key's rule (range, choices or doc) as its field declares it."""
    return {f"{name}.{f.name}": f.metadata[rule]
            for name, cls in tables.items() for f in dataclasses.fields(cls) if rule in f.metadata}


_RANGES: dict[str, tuple[float, float]] = _rules("range", _SECTIONS)  # (minimum, maximum) of a number
_CHOICES: dict[str, tuple[str, ...]] = _rules("choices", _SECTIONS)  # what a string key may be
_DOCS: dict[str, str] = _rules("doc", _TABLES)  # every key's one-line doc


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
