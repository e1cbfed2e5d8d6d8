"""DNS block lists and allow lists (RFC 5782): score the client's address by the zones that list it.

For a client 192.0.2.10 and a zone bl.example the query is the A record of
10.2.0.192.bl.example (RFC 5782 §2.1); for IPv6 the 32 nibbles of the address, reversed
(§2.4).  An answer in 127.0.0.0/8 means "listed"; the zones say with which codes what kind
of listing.  Every block-list zone that lists the client adds its weight to the score, every
allow-list (DNSWL) zone takes its weight off.  At reject_score the client is refused, at
tag_score its messages get an X-DNSBL header for the filters further on.

Which answers count: an A record in 127.0.0.0/8, but not 127.0.0.1 (RFC 5782 §5 keeps it
out of every list, and some lists answer it to resolvers they refuse to serve) nor
127.255.255.x, the big lists' "query refused" answers (a public resolver, too many
queries).  Neither is a listing, and both are logged, since a list that refuses us protects
nothing.  An answer outside 127/8 is a wildcard or a hijacked NXDOMAIN, not a listing either.

The lookups go through the shared resolver (services.dns), so its cache answers a client
that connects again, and they run one zone after the other in the session's own thread:
threads come one per connection, so lookups of many sessions run side by side with no pool
to queue behind, and a cached answer costs nothing.  A zone that fails (SERVFAIL, timeout)
is skipped for that connection.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any, ClassVar, NamedTuple

from elemta.plugins import api

REJECT_AT = ("connect", "rcpt")
ZONE_KEYS = ("zone", "weight", "codes")
LISTED = ipaddress.ip_network("127.0.0.0/8")  # RFC 5782 §2.1: listings answer in 127/8
REFUSED = ipaddress.ip_network("127.255.255.0/24")  # "query refused" answers, not listings
NEVER = ipaddress.ip_address("127.0.0.1")  # not a listing (see above)


class Zone(NamedTuple):
    name: str
    weight: float
    codes: frozenset[str]  # answers that count; empty: any listing answer


class DnsblPlugin(api.Plugin):
    default_timeout: ClassVar[float] = 0.0  # in the session's thread: its lookups end at the resolver's lifetime
    options: ClassVar[dict[str, Any]] = {
        "zones": [],  # [{zone = "bl.example", weight = 1.0, codes = ["127.0.0.2"]}, ...]
        "allow_zones": [],  # the same for allow lists; their weight is subtracted
        "reject_score": 1.0,
        "tag_score": 0.5,
        "reject_at": "rcpt",  # or "connect"
    }

    def __init__(self, name: str):
        super().__init__(name)
        self.configure(dict(self.options))

    def configure(self, options: dict) -> None:
        o = {**self.options, **options}
        self.zones = _zones(o["zones"], "zones")
        self.allow_zones = _zones(o["allow_zones"], "allow_zones")
        for key in ("reject_score", "tag_score"):
            value = o[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise api.PluginError(f"{key}: must be a number above 0, not {value!r}")
        if o["reject_at"] not in REJECT_AT:
            raise api.PluginError(f"reject_at: must be one of {', '.join(REJECT_AT)}, not {o['reject_at']!r}")
        self.reject_score, self.tag_score = float(o["reject_score"]), float(o["tag_score"])
        self.reject_at = o["reject_at"]

    def start(self, services: api.Services) -> None:
        super().start(services)
        if (self.zones or self.allow_zones) and services.dns is None:
            raise api.PluginError("zones: no DNS resolver to look them up with")

    # ---- hooks ------------------------------------------------------------------------------

    def on_connect(self, ctx: api.Context) -> api.Verdict | None:
        conn = ctx.connection
        if conn is None or conn.trusted or not (self.zones or self.allow_zones):
            return None
        try:
            reversed_ip = query_name(conn.ip)
        except ValueError:
            return None  # not an IP address (a UNIX socket peer): nothing to look up
        listed = [zone for zone in self.zones if self._listed(zone, reversed_ip, conn.ip)]
        allowed = [zone for zone in self.allow_zones if self._listed(zone, reversed_ip, conn.ip)]
        # Rounded so that weights such as 0.1 + 0.2 + 0.7 reach a reject_score of 1.
        score = round(sum(z.weight for z in listed) - sum(z.weight for z in allowed), 6)
        result: dict[str, Any] = {"score": score, "listed": [z.name for z in listed],
                                  "allowed": [z.name for z in allowed]}
        conn.notes["dnsbl"] = result
        if listed or allowed:
            self.log("listed", ip=conn.ip, score=score, listed=",".join(result["listed"]),
                     allowed=",".join(result["allowed"]))
        # At connect only on MX listeners: a user on the submission port may well connect from
        # an address a policy list names (dynamic ranges); AUTH exempts them at RCPT instead.
        if self.reject_at == "connect" and conn.role == "mx" and score >= self.reject_score:
            return self._refusal(conn.ip, result)
        return None

    def on_rcpt_to(self, ctx: api.Context) -> api.Verdict | None:
        # Refusing at RCPT rather than at the greeting (Postfix's way) puts the sender and the
        # recipient in the log line, so a false positive can be traced to who was affected.
        conn = ctx.connection
        if self.reject_at != "rcpt" or conn is None or conn.outbound:
            return None
        result = conn.notes.get("dnsbl")
        if result is not None and result["score"] >= self.reject_score:
            return self._refusal(conn.ip, result)
        return None

    def on_message(self, ctx: api.Context) -> api.Verdict | None:
        conn = ctx.connection
        if conn is None or conn.outbound:
            return None
        result = conn.notes.get("dnsbl")
        if result is None or result["score"] < self.tag_score:
            return None
        value = f"score={result['score']:g} listed={','.join(result['listed'])}"
        if result["allowed"]:
            value += f" allowed={','.join(result['allowed'])}"
        return api.proceed(add_headers=(("X-DNSBL", value),))

    # ---- lookups ------------------------------------------------------------------------------

    def _refusal(self, ip: str, result: dict) -> api.Verdict:
        # RFC 5321 §3.1: 554 is also the greeting of a server that will not talk to this
        # client; RFC 3463 5.7.1: delivery not authorized.
        listed = ", ".join(result["listed"])
        return api.reject(554, "5.7.1", f"Service unavailable; client [{ip}] listed by {listed}")

    def _listed(self, zone: Zone, reversed_ip: str, ip: str) -> bool:
        try:
            answers = self.require_dns().a(f"{reversed_ip}.{zone.name}")
        except api.DnsError as exc:
            self.log("dns_error", zone=zone.name, ip=ip, error=exc.text)
            return False
        hit = False
        for answer in answers:
            code = ipaddress.ip_address(answer)
            if code not in LISTED or code == NEVER:
                self.log("bad_answer", zone=zone.name, ip=ip, answer=answer)
            elif code in REFUSED:
                self.log("zone_refused", zone=zone.name, ip=ip, answer=answer)
            elif not zone.codes or answer in zone.codes:
                hit = True
        return hit


def query_name(ip: str) -> str:
    """The client's part of the query name: reversed octets (IPv4) or nibbles (IPv6)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:192.0.2.1 is an IPv4 client
    # reverse_pointer is "10.2.0.192.in-addr.arpa" or "1.0.0...8.b.d.0.1.0.0.2.ip6.arpa".
    return address.reverse_pointer.rsplit(".", 2)[0]


def _zones(value, option: str) -> tuple[Zone, ...]:
    if not isinstance(value, list):
        raise api.PluginError(f"{option}: must be a list of tables {{zone = ..., weight = ..., codes = [...]}}")
    zones = []
    for index, table in enumerate(value):
        where = f"{option}[{index}]"
        api.check_table(where, table, ZONE_KEYS)
        name = table.get("zone")
        if not isinstance(name, str) or not _is_zone_name(name.strip().rstrip(".")):
            raise api.PluginError(f"{where}.zone: must be a domain name such as \"bl.example.org\", not {name!r}")
        weight = table.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise api.PluginError(f"{where}.weight: must be a number above 0, not {weight!r}")
        codes = table.get("codes", [])
        if not isinstance(codes, list):
            raise api.PluginError(f"{where}.codes: must be a list of addresses such as \"127.0.0.2\"")
        normal = set()
        for code in codes:
            try:
                address = ipaddress.IPv4Address(code)
            except (TypeError, ValueError):
                address = None
            if address is None or address not in LISTED:
                raise api.PluginError(f"{where}.codes: {code!r} is not an address in 127.0.0.0/8")
            normal.add(str(address))
        zones.append(Zone(name.strip().rstrip(".").lower(), float(weight), frozenset(normal)))
    return tuple(zones)


def _is_zone_name(name: str) -> bool:
    # Room for the 63 octets of an IPv6 query's nibbles within the 253 of a name.
    labels = name.split(".")
    return name.isascii() and len(name) <= 253 - 64 and all(0 < len(label) < 64 for label in labels)
