"""Routing: which next hop a recipient's mail goes to.

In this order (docs/delivery.md):
  1. local domains (smtp.local_domains): aliases are expanded, unknown users fail with 5.1.1,
     the rest go to local.transport (LMTP, e.g. Dovecot, or a Maildir);
  2. delivery.transport, by exact domain, then by parent domain written ".example.org";
  3. delivery.relayhost (a smarthost), with AUTH from delivery.relayhost_auth_file;
  4. the domain's MX hosts (RFC 5321 §5.1), found through delivery.dns.
Explicit next hops (transport map, relayhost) are connected to directly, without MX lookup.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from elemta import filemodes
from elemta import transport as tmod
from elemta.config import Config
from elemta.delivery.dns import Resolver
from elemta.errors import ConfigError
from elemta.local import LocalRecipients


@dataclass(frozen=True)
class Route:
    """Where one recipient goes. Recipients of one message with equal routes share a transaction."""

    kind: str  # smtp | lmtp | maildir | hold | discard | error | expand
    hosts: tuple[str, ...] = ()  # host names or IP addresses to try, in order
    port: int = 25
    path: str = ""  # LMTP unix socket, or Maildir template
    tls_policy: str = "dane"  # delivery.tls_policy's default
    auth: tuple[str, str] | None = None
    status: str = ""  # error: RFC 3463 status
    text: str = ""  # error: the reason
    targets: tuple[str, ...] = ()  # expand: the alias's final addresses
    mx: bool = False  # hosts came from an MX lookup
    # What chose it (local, transport, relayhost, literal, mx), for route explain; not part of
    # what the route is (equal routes share a transaction whatever chose them).
    via: str = field(default="", compare=False)

    @property
    def destination(self) -> tuple:
        """The key that concurrency and rate limits count by: one provider = one destination."""
        if self.kind in ("smtp", "lmtp"):
            return (self.kind, self.path, tuple(sorted(self.hosts)) if self.mx else self.hosts, self.port)
        return (self.kind,)

    def describe(self) -> str:
        if self.kind in ("smtp", "lmtp"):
            if self.path:
                return f"lmtp:unix:{self.path}"
            return f"{self.kind}:{','.join(self.hosts)}:{self.port}"
        return self.kind


class Router:
    def __init__(self, config: Config, resolver: Resolver, recipients: LocalRecipients | None = None) -> None:
        self.config = config
        self.resolver = resolver
        self.recipients = recipients or LocalRecipients.from_config(config)
        d = config.delivery
        self._local = tmod.parse(config.local.transport)
        self._map = {domain: tmod.parse(text) for domain, text in d.transport.items()}
        self._relay = tmod.split_next_hop(d.relayhost) if d.relayhost else None
        self._relay_auth = read_auth_file(d.relayhost_auth_file) if d.relayhost_auth_file else None

    def route(self, address: str, *, expand: bool = True) -> Route:
        """The route for one recipient address; raises dns.DnsError when DNS cannot say.

        expand=False for the targets of an expansion: they are final addresses, so an alias
        that keeps a copy for itself ("bob" -> "bob, archive") is not expanded again.
        """
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if self.recipients.is_local(address):
            if expand:
                targets = self.recipients.expand(address)
                if not targets:
                    return Route("error", status="5.1.1", text=f"<{address}>: no such user here (or an alias loop)",
                                 via="local")
                if tuple(t.lower() for t in targets) != (address.lower(),):
                    return Route("expand", targets=targets, via="local")
            elif not self.recipients.exists(address):
                return Route("error", status="5.1.1", text=f"<{address}>: no such user here", via="local")
            return self._from_transport(self._local, domain, "local")
        found = self._transport_for(domain)
        if found is not None:
            return self._from_transport(found, domain, "transport")
        if self._relay is not None:
            host, port = self._relay
            d = self.config.delivery
            return Route("smtp", (host,), port, tls_policy=d.relayhost_tls_policy, auth=self._relay_auth,
                         via="relayhost")
        literal = _address_literal(domain)
        if literal:
            return Route("smtp", (literal,), self.config.delivery.mx_port, tls_policy=self._policy(domain),
                         via="literal")
        hosts = self.resolver.mx_hosts(domain)
        return Route("smtp", tuple(hosts), self.config.delivery.mx_port, tls_policy=self._policy(domain), mx=True,
                     via="mx")

    def answers_now(self, address: str) -> bool:
        """Whether route(address) needs no DNS answer that is not in the cache: everything but
        an MX lookup is the configuration's, and one is cached for the records' TTL."""
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if (self.recipients.is_local(address) or self._relay is not None or self._transport_for(domain) is not None
                or _address_literal(domain)):
            return True
        return self.resolver.mx_hosts_cached(domain)

    def _transport_for(self, domain: str) -> tmod.Transport | None:
        if domain in self._map:
            return self._map[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self._map:
                return self._map[parent]
        return None

    def _from_transport(self, t: tmod.Transport, domain: str, via: str) -> Route:
        if t.kind in ("hold", "discard"):
            return Route(t.kind, via=via)
        if t.kind == "error":
            return Route("error", status=t.status, text=t.text or "delivery refused by transport map", via=via)
        if t.kind == "maildir":
            return Route("maildir", path=t.path, via=via)
        if t.path:  # lmtp:unix:/path
            return Route("lmtp", path=t.path, port=0, tls_policy="none", via=via)
        # LMTP to a mailbox server is a local hop: no TLS unless the map says otherwise.
        policy = "none" if t.kind == "lmtp" else self._policy(domain)
        return Route(t.kind, (t.host,), t.port, tls_policy=policy, via=via)

    def _policy(self, domain: str) -> str:
        d = self.config.delivery
        return d.tls_policies.get(domain, d.tls_policy)


def read_auth_file(path: str) -> tuple[str, str]:
    """'user:password' on the first line; kept out of elemta.toml so that file can be world-readable."""
    filemodes.check_secret(path, "delivery.relayhost_auth_file")
    try:
        with open(path, encoding="utf-8") as handle:
            line = handle.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"delivery.relayhost_auth_file: {path}: {exc.strerror or exc}") from None
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise ConfigError(f"delivery.relayhost_auth_file: {path}: expected one line user:password")
    return user, password


def _address_literal(domain: str) -> str:
    """'[192.0.2.1]' or '[ipv6:2001:db8::1]' (RFC 5321 §4.1.3) -> the address, else ''."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return ""
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return ""
