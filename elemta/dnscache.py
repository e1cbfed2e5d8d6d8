"""DNS lookups with one shared, bounded, TTL-respecting cache (dnspython).

Delivery (MX and addresses, delivery/dns.py) and the plugins (TXT for SPF, DKIM and DMARC,
A for DNSBL zones) ask through one Resolver, so a name looked up by one is cached for all.
The lock guards only the cache, never network I/O; two threads missing the same name at
once both query, which is harmless.

Failures are DnsError with an RFC 3463 enhanced status code; its first digit says whether
the failure is permanent (5) or worth a retry (4).
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import idna

from elemta import metrics
from elemta.errors import ElemtaError

MIN_TTL = 1  # a TTL of 0 would mean one query per delivery attempt
MAX_TTL = 86400  # re-check at least daily, whatever the zone says
MAX_NEGATIVE_TTL = 900  # RFC 2308 §5: negative answers SHOULD be cached 1-3 hours at most;
# we keep it shorter because a new domain (or MX) should start working soon.

_ASCII_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
OK, NXDOMAIN, NODATA = "ok", "nxdomain", "nodata"
ROOT = "."


class DnsError(ElemtaError):
    """A lookup that gave no usable answer.

    enhanced is an RFC 3463 code ("5.1.2", "4.4.3", ...); text is for humans
    and names the domain or host.
    """

    def __init__(self, text: str, enhanced: str):
        super().__init__(text)
        self.text = text
        self.enhanced = enhanced

    @property
    def permanent(self) -> bool:
        return self.enhanced.startswith("5")


class NotCached(Exception):
    """lookup(cached_only=True) found no fresh answer in the cache: asking needs the network."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """"ip", "ip:port" or "[ipv6]:port" -> (ip, port); ValueError if malformed."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"nameserver {text!r}: expected [IPv6]:port")
        if rest:
            port = rest[1:]
    elif host.count(":") == 1:  # "ip:port"; a bare IPv6 address has two or more colons
        host, _, port = host.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {text!r}: {host!r} is not an IP address") from None
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"nameserver {text!r}: port must be 1-65535")
    return str(address), int(port)


def a_label(domain: str) -> str:
    """The A-label form of domain, lower case, without a trailing dot (RFC 5890 §2.3.2.1).

    DnsError 5.1.3 (bad destination address syntax) if it is no valid host name.
    """
    labels = []
    for label in domain.strip().removesuffix(".").split("."):
        if not label.isascii():
            # UTS #46 mapping folds case and width, as in elemta.smtp.address.
            try:
                label = idna.encode(label, uts46=True).decode("ascii")
            except UnicodeError:
                label = ""  # fails the check below
        label = label.lower()
        if not _ASCII_LABEL.fullmatch(label):
            raise DnsError(f"{domain!r} is not a valid domain name", "5.1.3")
        labels.append(label)
    name = ".".join(labels)
    if len(name) > 253:  # RFC 1035 §2.3.4: 255 octets on the wire
        raise DnsError(f"{domain!r} is not a valid domain name (too long)", "5.1.3")
    return name


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def name_text(name: dns.name.Name) -> str:
    return ROOT if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def dns_resolver(nameservers: Sequence[str], timeout: float) -> dns.resolver.Resolver:
    """A dnspython resolver asking `nameservers` ("ip", "ip:port", "[ipv6]:port"; () reads
    /etc/resolv.conf) with no cache of its own and no search list; ValueError if none."""
    if isinstance(nameservers, str):
        raise TypeError("nameservers must be a sequence of strings, not one string")
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        ports: dict[str, int] = {}
        for entry in nameservers:
            ip, port = parse_nameserver(entry)
            if ports.setdefault(ip, port) != port:
                # dnspython 2.3 keeps one port per address (nameserver_ports).
                raise ValueError(f"nameserver {ip} given with two ports")
        resolver.nameservers = list(ports)
        resolver.nameserver_ports = ports
    else:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            raise ValueError("no nameservers given and none in /etc/resolv.conf") from None
    # We only ask fully-qualified names: a recipient domain must never be
    # completed with the local search list (RFC 5321 §5.1 has no such step).
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.ndots = None
    resolver.lifetime = timeout
    resolver.timeout = min(resolver.timeout, timeout)  # per server try
    resolver.cache = None  # callers cache, with their own clock and bound
    return resolver


class Resolver:
    """Lookups of any record type through a shared, bounded, TTL-respecting cache.

    nameservers: "ip", "ip:port" or "[ipv6]:port"; () reads /etc/resolv.conf.
    timeout: seconds one lookup may take in all (dnspython's lifetime).
    clock: seconds, monotonic; tests pass a fake one to expire entries.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10000,
    ):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._dns = dns_resolver(nameservers, timeout)
        self._clock = clock
        self._max_entries = max_entries
        self._lock = threading.Lock()
        # (name, rdtype) -> (expires, status, records); order is least recently used first.
        self._cache: OrderedDict[tuple[str, int], tuple[float, str, tuple]] = OrderedDict()
        self._hits = 0
        self._misses = 0

    # -- public ------------------------------------------------------------------

    def txt(self, name: str) -> list[str]:
        """The TXT records of name, each one's strings joined (RFC 7208 §3.3, RFC 6376
        §3.6.2.2); [] when there are none or the name does not exist."""
        return self.txt_until(name)[0]

    def txt_until(self, name: str) -> tuple[list[str], float]:
        """txt(), and until when the answer stays valid (see lookup_until)."""
        status, records, until = self.lookup_until(name_of(name), dns.rdatatype.TXT)
        texts = [b"".join(strings).decode("utf-8", "replace") for strings in records] if status == OK else []
        return texts, until

    def a(self, name: str) -> list[str]:
        """The IPv4 addresses of name; [] when there are none or the name does not exist."""
        status, records = self.lookup(name_of(name), dns.rdatatype.A)
        return list(records) if status == OK else []

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "entries": len(self._cache)}

    def clear(self) -> None:
        """Forget every cached answer (the hit and miss counters are kept)."""
        with self._lock:
            self._cache.clear()

    # -- lookups -----------------------------------------------------------------

    def lookup(self, name: str, rdtype: dns.rdatatype.RdataType, cached_only: bool = False) -> tuple[str, tuple]:
        """(status, records) from the cache or the nameservers; DnsError 4.4.3 on failure.

        status is OK, NXDOMAIN or NODATA.  A record is (preference, host) for MX, the
        address text for A and AAAA, the host name for PTR and CNAME, and the tuple of
        its character strings (bytes) for TXT.
        """
        status, records, _until = self.lookup_until(name, rdtype, cached_only)
        return status, records

    def lookup_until(self, name: str, rdtype: dns.rdatatype.RdataType,
                     cached_only: bool = False) -> tuple[str, tuple, float]:
        """lookup(), and until when (on now()'s clock) the answer stays valid: a result
        computed from answers may be kept as long as the earliest of them (an answer
        not cached is valid only now).  cached_only: NotCached instead of a query."""
        key = (name, rdtype)
        with self._lock:
            now = self._clock()
            entry = self._cache.get(key)
            if entry is not None and entry[0] > now:
                self._cache.move_to_end(key)
                self._hits += 1
                metrics.DNS_CACHE.labels("hit").inc()
                return entry[1], entry[2], entry[0]
            if entry is not None:
                del self._cache[key]  # expired
            if cached_only:
                raise NotCached(name)
            self._misses += 1
        metrics.DNS_CACHE.labels("miss").inc()
        status, records, ttl = self._query(name, rdtype)
        now = self._clock()
        if ttl is None:
            return status, records, now
        with self._lock:
            self._cache[key] = (now + ttl, status, records)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)  # least recently used
        return status, records, now + ttl

    def peek(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[str, tuple] | None:
        """(status, records) if the cache holds a fresh answer, else None; never asks a
        nameserver and is not counted as a hit or a miss (a question about the cache)."""
        with self._lock:
            entry = self._cache.get((name, rdtype))
            return (entry[1], entry[2]) if entry is not None and entry[0] > self._clock() else None

    def now(self) -> float:
        """The clock lookup_until() answers on."""
        return self._clock()

    def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[str, tuple, float | None]:
        """Ask the nameservers: (status, records, seconds to cache or None).

        Failures are not cached: the scheduler already backs off per message,
        and a SERVFAIL is often over by the next attempt (RFC 2308 §7.1 allows
        5 minutes, but nothing requires it).
        """
        what = f"{name} {dns.rdatatype.to_text(rdtype)}"
        try:
            answer = self._dns.resolve(
                dns.name.from_text(name), rdtype, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())
            ttl = _negative_ttl(responses[0]) if responses else None
            return NXDOMAIN, (), ttl
        except dns.exception.Timeout:
            raise DnsError(f"DNS lookup of {what} timed out", "4.4.3") from None
        except dns.resolver.NoNameservers:
            # SERVFAIL, REFUSED, or nothing usable from any server.
            raise DnsError(f"DNS lookup of {what} failed: no server answered", "4.4.3") from None
        except dns.exception.DNSException as exc:
            raise DnsError(f"DNS lookup of {what} failed: {exc}", "4.4.3") from None
        if answer.rrset is None:
            return NODATA, (), _negative_ttl(answer.response)
        records = tuple(_record(rd) for rd in answer.rrset)
        # minimum_ttl covers the answer RRset and any CNAMEs leading to it.
        ttl = answer.chaining_result.minimum_ttl
        return OK, records, min(max(ttl, MIN_TTL), MAX_TTL)


def _negative_ttl(response) -> float | None:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM); no SOA in the authority section: don't cache."""
    if not any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority):
        return None
    ttl = response.resolve_chaining().minimum_ttl  # includes the SOA rule above
    return min(max(ttl, MIN_TTL), MAX_NEGATIVE_TTL)


def _record(rd) -> object:
    if rd.rdtype == dns.rdatatype.MX:
        return rd.preference, name_text(rd.exchange)
    if rd.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rd.address
    if rd.rdtype == dns.rdatatype.TXT:
        return tuple(rd.strings)
    if rd.rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME):
        return name_text(rd.target)
    return rd.to_text()


def name_of(name: str) -> str:
    """A name to look up as given, without a trailing dot; DnsError 5.1.3 if it is not
    one.  Unlike a_label, labels may hold any octets such as "_dmarc" or an address's
    reversed digits, as DNSBL and DKIM names do."""
    text = name.strip().removesuffix(".").lower()
    if not text.isascii():
        return a_label(text)
    if not text or len(text) > 253 or not all(0 < len(label) < 64 for label in text.split(".")):
        raise DnsError(f"{name!r} is not a valid domain name", "5.1.3")
    return text
