"""DNS for delivery: the next hops of a recipient domain (RFC 5321 §5.1).

One Resolver is shared by every delivery thread. It keeps its own cache of
answers keyed by (name, type), so a burst of messages to one domain costs one
lookup per TTL. The lock guards only the cache, never network I/O; two threads
missing the same name at once both query, which is harmless.

Failures are DnsError with an RFC 3463 enhanced status code; its first digit
says whether the scheduler should bounce (5) or retry later (4).
"""

from __future__ import annotations

import ipaddress
import itertools
import random
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

from elemta.errors import ElemtaError

MIN_TTL = 1  # a TTL of 0 would mean one query per delivery attempt
MAX_TTL = 86400  # re-check at least daily, whatever the zone says
MAX_NEGATIVE_TTL = 900  # RFC 2308 §5: negative answers SHOULD be cached 1-3 hours at most;
# we keep it shorter because a new domain (or MX) should start working soon.

_ASCII_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_OK, _NXDOMAIN, _NODATA = "ok", "nxdomain", "nodata"
_ROOT = "."


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
    if not port.isdigit() or not 0 < int(port) < 65536:
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


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _name_text(name: dns.name.Name) -> str:
    return _ROOT if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


class Resolver:
    """MX and address lookups with a shared, bounded, TTL-respecting cache.

    nameservers: "ip", "ip:port" or "[ipv6]:port"; () reads /etc/resolv.conf.
    timeout: seconds one lookup may take in all (dnspython's lifetime).
    clock: seconds, monotonic; tests pass a fake one to expire entries.
    prefer_ipv6: addresses() lists IPv6 first. Off by default: many hosts
    (and test machines) have no IPv6 route, and every unreachable address
    tried first costs a connect timeout.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10000,
        rng: random.Random | None = None,
        prefer_ipv6: bool = False,
    ):
        if isinstance(nameservers, str):
            raise TypeError("nameservers must be a sequence of strings, not one string")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
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
        resolver.cache = None  # ours below, with an injectable clock and a bound
        self._dns = resolver
        self._clock = clock
        self._max_entries = max_entries
        self._rng = rng or random.Random()
        self._prefer_ipv6 = prefer_ipv6
        self._lock = threading.Lock()
        # (name, rdtype) -> (expires, status, records); order is least recently used first.
        self._cache: OrderedDict[tuple[str, int], tuple[float, str, tuple]] = OrderedDict()
        self._hits = 0
        self._misses = 0

    # -- public ------------------------------------------------------------------

    def mx_hosts(self, domain: str) -> list[str]:
        """Host names to try for domain, best first (RFC 5321 §5.1)."""
        name = a_label(domain)
        status, records = self._lookup(name, dns.rdatatype.MX)
        if status == _NXDOMAIN:
            raise DnsError(f"domain {name} does not exist", "5.1.2")
        if status == _NODATA:
            # RFC 5321 §5.1: no MX records -> the domain itself is the implicit
            # MX, but only if it has an address; otherwise it is not a mail domain.
            found, error = self._address_records(name)
            if found:
                return [name]
            if error is not None:
                raise error
            raise DnsError(f"domain {name} has no MX and no A/AAAA records", "5.1.2")
        if len(records) == 1 and records[0][1] == _ROOT:
            # RFC 7505 §3: a lone MX with the root as exchange: no mail accepted.
            raise DnsError(f"domain {name} does not accept mail (null MX)", "5.1.10")
        # RFC 7505 §3 forbids a null MX among others, and an MX exchange must be
        # a host name, not an address (RFC 5321 §5.1): skip both, use the rest.
        usable = sorted(
            (pref, host) for pref, host in records if host != _ROOT and not _is_ip_literal(host)
        )
        if not usable:
            # Misconfigured at the recipient's end and fixable there: retry, and
            # let the queue lifetime turn a lasting fault into a bounce.
            raise DnsError(f"domain {name} has no usable MX host", "4.4.4")
        hosts: list[str] = []
        for _, group in itertools.groupby(usable, key=lambda r: r[0]):
            same = [host for _, host in group]
            with self._lock:  # random.Random is not documented as thread-safe
                self._rng.shuffle(same)  # RFC 5321 §5.1: spread load over equal preferences
            hosts.extend(h for h in same if h not in hosts)
        return hosts

    def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of host (IPv6 first with prefer_ipv6).

        A host without addresses is a transient error (4.4.4): it normally is
        an MX host whose A record is missing or not yet published; that is
        fixed at the recipient's end, other MX hosts may still work, and the
        queue lifetime bounds the retries. (Postfix defers likewise.)
        """
        name = a_label(host)
        found, error = self._address_records(name)
        if found:
            return found
        if error is not None:
            raise error
        raise DnsError(f"host {name} has no A or AAAA record", "4.4.4")

    def destination(self, domain: str) -> tuple[str, ...]:
        """Key for per-destination limits: domains with the same MX hosts share one."""
        return tuple(sorted(set(self.mx_hosts(domain))))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "entries": len(self._cache)}

    def clear(self) -> None:
        """Forget every cached answer (the hit and miss counters are kept)."""
        with self._lock:
            self._cache.clear()

    # -- lookups -----------------------------------------------------------------

    def _address_records(self, name: str) -> tuple[list[str], DnsError | None]:
        """(addresses, transient error or None); one failed family does not hide the other."""
        types = [dns.rdatatype.A, dns.rdatatype.AAAA]
        if self._prefer_ipv6:
            types.reverse()
        found: list[str] = []
        error = None
        for rdtype in types:
            try:
                status, records = self._lookup(name, rdtype)
            except DnsError as exc:
                error = exc
                continue
            if status == _OK:
                found.extend(records)
        return found, error

    def _lookup(self, name: str, rdtype: int) -> tuple[str, tuple]:
        """(status, records) from the cache or the nameservers; DnsError 4.4.3 on failure."""
        key = (name, rdtype)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry[0] > self._clock():
                self._cache.move_to_end(key)
                self._hits += 1
                return entry[1], entry[2]
            if entry is not None:
                del self._cache[key]  # expired
            self._misses += 1
        status, records, ttl = self._query(name, rdtype)
        if ttl is not None:
            with self._lock:
                self._cache[key] = (self._clock() + ttl, status, records)
                self._cache.move_to_end(key)
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)  # least recently used
        return status, records

    def _query(self, name: str, rdtype: int) -> tuple[str, tuple, float | None]:
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
            return _NXDOMAIN, (), ttl
        except dns.exception.Timeout:
            raise DnsError(f"DNS lookup of {what} timed out", "4.4.3") from None
        except dns.resolver.NoNameservers:
            # SERVFAIL, REFUSED, or nothing usable from any server.
            raise DnsError(f"DNS lookup of {what} failed: no server answered", "4.4.3") from None
        except dns.exception.DNSException as exc:
            raise DnsError(f"DNS lookup of {what} failed: {exc}", "4.4.3") from None
        if answer.rrset is None:
            return _NODATA, (), _negative_ttl(answer.response)
        if rdtype == dns.rdatatype.MX:
            records = tuple((rd.preference, _name_text(rd.exchange)) for rd in answer.rrset)
        else:
            records = tuple(rd.address for rd in answer.rrset)
        # minimum_ttl covers the answer RRset and any CNAMEs leading to it.
        ttl = answer.chaining_result.minimum_ttl
        return _OK, records, min(max(ttl, MIN_TTL), MAX_TTL)


def _negative_ttl(response) -> float | None:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM); no SOA in the authority section: don't cache."""
    if not any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority):
        return None
    ttl = response.resolve_chaining().minimum_ttl  # includes the SOA rule above
    return min(max(ttl, MIN_TTL), MAX_NEGATIVE_TTL)
