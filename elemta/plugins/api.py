"""What a plugin sees and returns: the Plugin base class, the contexts of each hook, verdicts.

A plugin is a plain class that defines only the hooks it needs (HOOKS below).  Each hook gets
one Context and returns a Verdict (None means CONTINUE).  Plugins never change the envelope
themselves: the core reads the verdict and acts on it, so every rule of the core (relay policy,
limits, the queue's promise) holds whatever a plugin does.  docs/plugins.md has the table of
hooks and verdicts and a worked example.

Built-in plugins import only this module; what they need from the rest of elemta (the shared
DNS cache, the rate limiter, logging) is reached through it.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

from elemta.dnscache import DnsError, Resolver
from elemta.priorities import PRIORITIES
from elemta.ratelimit import RateLimit
from elemta.reply import Reply

__all__ = [
    "ACCEPT", "CONTINUE", "DISCARD", "HOOKS", "MESSAGE_HOOKS", "NOTICE_HOOKS", "SMTP_HOOKS",
    "Connection", "Context", "Delivery", "DnsError", "Message", "Plugin", "PluginError",
    "RateLimit", "Resolver", "Services", "Transaction", "Verdict",
    "defer", "network_of", "proceed", "quarantine", "reject",
]

# The hooks, in the order a message meets them.  SMTP hooks run in the connection's thread
# before the reply to that command; a reject or defer there becomes the reply.
SMTP_HOOKS = ("on_connect", "on_helo", "on_auth", "on_mail_from", "on_rcpt_to", "on_data", "on_message")
# Delivery: on_pre_delivery runs before each attempt of a message's due recipients.
DELIVERY_HOOKS = ("on_pre_delivery",)
# Notices: what they return is counted but changes nothing (the event has happened).
NOTICE_HOOKS = ("on_enqueue", "on_delivery_success", "on_delivery_failure", "on_disconnect")
HOOKS = SMTP_HOOKS + DELIVERY_HOOKS + NOTICE_HOOKS
# Hooks inside a mail transaction: headers they add go into that message.
MESSAGE_HOOKS = ("on_mail_from", "on_rcpt_to", "on_data", "on_message")

ACTIONS = ("continue", "accept", "reject", "defer", "discard", "quarantine")


class PluginError(Exception):
    """Raised by a plugin's configure() or start() for a setting or resource it cannot use;
    the message names the option.  The daemon refuses to start with it."""


def check_table(where: str, table: Any, keys: tuple[str, ...]) -> dict:
    """One table of an option that is a list of tables ([{zone = ...}, ...]): PluginError
    naming `where` unless it is a table with no keys but these."""
    if not isinstance(table, dict):
        raise PluginError(f"{where}: must be a table {{{', '.join(f'{k} = ...' for k in keys)}}}")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise PluginError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(keys)})")
    return table


@dataclass(frozen=True)
class Verdict:
    """What a hook decided.

    action:
      continue    go on with the next plugin and the core (the default)
      accept      skip the later plugins of this hook; the core still applies its own rules
      reject      refuse with code (5xx), esc and text; at on_connect the session is closed
      defer       refuse for now with code (4xx), esc and text
      discard     the message gets its 250 but is not queued (at on_pre_delivery: the due
                  recipients are dropped as delivered)
      quarantine  the message is queued held (elemtactl queue release lets it go)
    add_headers: (name, value) fields put at the top of the message (transaction hooks only).
    remove_headers: field names taken out of the message (on_message only).
    auth_results: RFC 8601 method results ("spf=pass smtp.mailfrom=example.com") that the
      core writes into the one Authentication-Results header of the message.
    priority: set the message's queue priority (critical, high, normal, low).
    reason: a short word or phrase for the log line (quarantine, discard).
    """

    action: str = "continue"
    code: int = 0
    esc: str = ""
    text: str = ""
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    auth_results: tuple[str, ...] = ()
    priority: str | None = None
    reason: str = ""

    def __post_init__(self):
        problem = _verdict_problem(self)
        if problem:
            raise ValueError(f"bad verdict: {problem}")

    @property
    def final(self) -> bool:
        """True when the later plugins of the hook do not run."""
        return self.action != "continue"

    @property
    def reply(self) -> Reply | None:
        """The refusal as the core sends or records it (reject and defer), else None.

        A plugin gives code, esc and text as three values (api.reject(), api.defer()), the
        way plugins.md documents them; the core only ever reads this one reply."""
        if self.action not in ("reject", "defer"):
            return None
        return Reply(self.code, self.esc, self.text)


def _verdict_problem(v: Verdict) -> str | None:
    if v.action not in ACTIONS:
        return f"action {v.action!r} is not one of {', '.join(ACTIONS)}"
    if v.action == "reject" and not 500 <= v.code <= 559:
        return f"reject needs a 5xx code, not {v.code}"
    if v.action == "defer" and not 400 <= v.code <= 459:
        return f"defer needs a 4xx code, not {v.code}"
    if v.action in ("reject", "defer"):
        klass = str(v.code)[0]
        parts = v.esc.split(".")
        if len(parts) != 3 or parts[0] != klass or not all(p.isascii() and p.isdigit() for p in parts):
            return f"enhanced code {v.esc!r} does not fit {v.code} (RFC 3463: {klass}.x.y)"
        if not v.text or "\r" in v.text or "\n" in v.text or not v.text.isprintable():
            return "text must be one printable line"
    if v.priority is not None and v.priority not in PRIORITIES:
        return f"priority {v.priority!r} is not one of {', '.join(PRIORITIES)}"
    for name, value in v.add_headers:
        unfolded = value.replace("\r\n\t", "").replace("\r\n ", "")  # folding (RFC 5322 §2.2.3) is fine
        if not _is_field_name(name) or "\r" in unfolded or "\n" in unfolded:
            return f"header {name!r} is not a valid field (RFC 5322 §2.2)"
    for name in v.remove_headers:
        if not _is_field_name(name):
            return f"header name {name!r} is not valid"
    for result in v.auth_results:
        if not result or "\r" in result or "\n" in result or ";" in result:
            return f"auth result {result!r} must be one method result without ';'"
    return None


def _is_field_name(name: str) -> bool:
    return _FIELD_NAME.fullmatch(name) is not None


_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 §3.6.8: printable US-ASCII but ":" (no space)


CONTINUE = Verdict()
ACCEPT = Verdict("accept")
DISCARD = Verdict("discard")


def proceed(**extras: Any) -> Verdict:
    """CONTINUE with headers, auth results or a priority: proceed(add_headers=(...,))."""
    return Verdict("continue", **extras)


def reject(code: int = 550, esc: str = "5.7.1", text: str = "Rejected by policy", **extras: Any) -> Verdict:
    return Verdict("reject", code, esc, text, **extras)


def defer(code: int = 451, esc: str = "4.7.1", text: str = "Try again later", **extras: Any) -> Verdict:
    return Verdict("defer", code, esc, text, **extras)


def quarantine(reason: str, **extras: Any) -> Verdict:
    return Verdict("quarantine", reason=reason, **extras)


# Both cached: the same client asks for every message and recipient, and ipaddress parses slowly.
@functools.lru_cache(maxsize=4096)
def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address (an IPv4-mapped IPv6 one as IPv4), None if ip is not one."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address


@functools.lru_cache(maxsize=4096)
def network_of(ip: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The client's network as text ("192.0.2.0/24"): greylisting and reputation key on it,
    since big senders retry from another address of the same network."""
    address = client_address(ip)
    if address is None:
        raise ValueError(f"{ip!r} is not an IP address")
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


# ---- contexts ------------------------------------------------------------------------------


@dataclass
class Connection:
    """One SMTP connection; the same object for every hook of the connection."""

    ip: str
    port: int = 0
    listener: str = ""  # the listener's address as configured
    role: str = "mx"  # mx, submission or submissions
    trusted: bool = False  # from smtp.trusted_networks
    id: int = 0  # the conn= number in the log
    helo: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once TLS is up, else None
    user: str | None = None  # the authenticated user, else None
    notes: dict = field(default_factory=dict)  # plugins keep per-connection state here

    @property
    def outbound(self) -> bool:
        """Mail this connection sends is our users' own (authenticated or trusted): sign it
        rather than check it."""
        return self.user is not None or self.trusted


@dataclass
class Transaction:
    """One MAIL..DATA transaction; reset after each message."""

    queue_id: str
    sender: str  # "" for the null reverse-path <>
    recipients: list[str] = field(default_factory=list)  # accepted so far
    notes: dict = field(default_factory=dict)  # per-message state, e.g. the SPF result

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower() if "@" in self.sender else ""


class Message:
    """The message text as the client sent it (at on_message), before the core's Received
    and Authentication-Results fields.  Header access is parsed once, lazily."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self._fields: list[tuple[str, str]] | None = None

    @property
    def header_bytes(self) -> bytes:
        end = self.raw.find(b"\r\n\r\n")
        return self.raw if end < 0 else self.raw[: end + 2]

    @property
    def body(self) -> bytes:
        end = self.raw.find(b"\r\n\r\n")
        return b"" if end < 0 else self.raw[end + 4:]

    @property
    def fields(self) -> list[tuple[str, str]]:
        """(name, value) pairs in order; folded lines unfolded, values stripped."""
        if self._fields is None:
            fields: list[tuple[str, str]] = []
            for line in self.header_bytes.decode("utf-8", "surrogateescape").split("\r\n"):
                if line[:1] in (" ", "\t") and fields:
                    name, value = fields[-1]
                    fields[-1] = (name, value + " " + line.strip())
                elif ":" in line:
                    name, _, value = line.partition(":")
                    fields.append((name.strip(), value.strip()))
            self._fields = fields
        return self._fields

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.fields if key.lower() == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def from_domains(self) -> list[str]:
        """The domains of the From field's addresses (RFC 7489 §6.6.1 wants exactly one)."""
        domains = []
        for value in self.get_all("from"):
            simple = _SIMPLE_FROM.fullmatch(value)
            if simple:  # most From fields; the email package takes the rest (quotes, groups...)
                domains.append((simple.group(1) or simple.group(2)).lower().rstrip("."))
                continue
            for _, address in email.utils.getaddresses([value]):
                if "@" in address:
                    domains.append(address.rpartition("@")[2].lower().rstrip("."))
        return domains


# A From value of one plain address: "a@b.example", "<a@b.example>" or "Some Name <a@b.example>"
# with an unquoted display name of words.  No comments, quotes, groups or lists: those (and
# anything else) go through email.utils, whose parse of the simple ones is the same but slow.
_ADDR = r"[^\s<>()@,;:\\\"\[\]]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?)"
_SIMPLE_FROM = re.compile(rf"\s*(?:[^<>()@,;:\\\"\[\]]*<{_ADDR}>|{_ADDR})\s*")


@dataclass
class Delivery:
    """A delivery attempt of one message to one next hop."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    attempt: int = 1  # 1 on the first attempt
    next_hop: str = ""  # "smtp:[mx.example.com]", "lmtp:unix:/run/dovecot/lmtp", ...
    reply: str = ""  # the remote's reply (on_delivery_success / on_delivery_failure)
    permanent: bool = False  # on_delivery_failure: the recipients bounce


@dataclass
class Context:
    """What a hook gets; only the parts that exist at that hook are set."""

    hook: str
    connection: Connection | None = None
    transaction: Transaction | None = None
    recipient: str | None = None  # on_rcpt_to: the address being tried
    message: Message | None = None  # on_message
    delivery: Delivery | None = None  # the delivery hooks
    # RFC 8601 results earlier plugins gave for this message, "method=result ..." each
    # (DMARC reads the SPF and DKIM ones).
    auth_results: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Services:
    """What elemta lends every plugin at start()."""

    hostname: str  # server.hostname
    spool_dir: str  # where a plugin may keep state (e.g. greylist.db)
    dns: Resolver | None = None  # the shared cached resolver (delivery.resolvers)
    log: Any = None  # log(event, **fields): one line "plugin=<name> event key=value"
    authserv_id: str = ""  # smtp.authserv_id, the name in Authentication-Results
    workers: int = 1  # SMTP processes sharing the load (server.workers)
    # rate_limit(name, limit, window, max_keys=..., now=...): a rate limit with RateLimit's
    # methods whose counts all SMTP workers share; None where there is no shared memory (a
    # plugin then counts in its process, with an even share of its limit per worker).
    rate_limit: Callable[..., Any] | None = None


class Plugin:
    """Base class: subclass it, set `options` to the defaults of your config table, and
    define the hooks you need.  The manager checks each option in the config against the
    type of its default and calls configure() with the merged table."""

    options: ClassVar[dict[str, Any]] = {}
    # Seconds a call may take when the config gives no timeout; the call then runs in a pool
    # thread and the caller goes on without it past that.  0 runs it in the caller's thread
    # unguarded: right for a plugin that does no I/O, or whose every wait has its own limit
    # (the built-ins set 0: their DNS goes through the resolver's lifetime, SQLite waits its
    # busy timeout), and cheaper by two thread switches per hook.
    default_timeout: ClassVar[float] = 30.0

    def __init__(self, name: str):
        self.name = name
        self.services: Services | None = None

    def configure(self, options: dict[str, Any]) -> None:
        """Check and keep options (defaults already merged); raise PluginError naming a bad one."""

    def start(self, services: Services) -> None:
        """Open what the plugin needs (files, connections) before the first hook."""
        self.services = services

    def stop(self) -> None:
        """Release it; called once at shutdown, after the last hook has returned."""

    def require_services(self) -> Services:
        """The services, for a hook: the manager calls start() before the first hook."""
        assert self.services is not None, f"plugin {self.name}: a hook ran before start()"
        return self.services

    def require_dns(self) -> Resolver:
        """The shared resolver, for a plugin whose start() refuses to run without one."""
        dns = self.require_services().dns
        assert dns is not None, f"plugin {self.name}: start() checks that there is a resolver"
        return dns

    def health(self) -> str | None:
        """None when healthy, else why not (shown by elemtactl plugins)."""
        return None

    def log(self, event: str, **fields: Any) -> None:
        """One log line "<qid> <event> plugin=<name> key=value...": the queue ID is the one of
        the transaction or delivery the current hook runs for, unless fields give qid."""
        if self.services is not None and self.services.log is not None:
            qid = CURRENT_QID.get()
            if qid is not None:
                fields.setdefault("qid", qid)
            self.services.log(event, plugin=self.name, **fields)


# The queue ID of the transaction or delivery a hook is running for, set by the manager around
# each call (in whichever thread makes it), so that every line a plugin logs carries it and
# one grep finds the whole transaction (elemta(8), LOGGING), with no qid= at each call.
CURRENT_QID: ContextVar[str | None] = ContextVar("elemta_plugin_qid", default=None)


def queue_id_of(ctx: Context) -> str | None:
    if ctx.transaction is not None:
        return ctx.transaction.queue_id
    if ctx.delivery is not None:
        return ctx.delivery.queue_id
    return None
