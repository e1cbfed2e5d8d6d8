"""DNS for delivery: the next hops of a recipient domain (RFC 5321 §5.1).

One Resolver is shared by every delivery thread (and the plugins); its cache, bound and
failure rules are elemta/dnscache.py's.  Failures are DnsError with an RFC 3463 enhanced
status code; its first digit says whether the scheduler should bounce (5) or retry later (4).
"""

from __future__ import annotations

import itertools
import random

import dns.rdatatype

from elemta import dnscache
from elemta.dnscache import (
    NODATA,
    NXDOMAIN,
    OK,
    ROOT,
    DnsError,
    NotCached,
    a_label,
    is_ip_literal,
    parse_nameserver,
)

__all__ = ["DnsError", "NotCached", "Resolver", "a_label", "parse_nameserver"]


class Resolver(dnscache.Resolver):
    """MX and address lookups over the shared cache.

    prefer_ipv6: addresses() lists IPv6 first. Off by default: many hosts
    (and test machines) have no IPv6 route, and every unreachable address
    tried first costs a connect timeout.
    """

    def __init__(self, *args, rng: random.Random | None = None, prefer_ipv6: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._rng = rng or random.Random()
        self._prefer_ipv6 = prefer_ipv6

    def mx_hosts(self, domain: str) -> list[str]:
        """Host names to try for domain, best first (RFC 5321 §5.1)."""
        name = a_label(domain)
        status, records = self.lookup(name, dns.rdatatype.MX)
        if status == NXDOMAIN:
            raise DnsError(f"domain {name} does not exist", "5.1.2")
        if status == NODATA:
            # RFC 5321 §5.1: no MX records -> the domain itself is the implicit
            # MX, but only if it has an address; otherwise it is not a mail domain.
            found, error = self._address_records(name)
            if found:
                return [name]
            if error is not None:
                raise error
            raise DnsError(f"domain {name} has no MX and no A/AAAA records", "5.1.2")
        if len(records) == 1 and records[0][1] == ROOT:
            # RFC 7505 §3: a lone MX with the root as exchange: no mail accepted.
            raise DnsError(f"domain {name} does not accept mail (null MX)", "5.1.10")
        # RFC 7505 §3 forbids a null MX among others, and an MX exchange must be
        # a host name, not an address (RFC 5321 §5.1): skip both, use the rest.
        usable = sorted(
            (pref, host) for pref, host in records if host != ROOT and not is_ip_literal(host)
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

    def addresses(self, host: str, cached_only: bool = False) -> list[str]:
        """IPv4 then IPv6 addresses of host (IPv6 first with prefer_ipv6).

        A host without addresses is a transient error (4.4.4): it normally is
        an MX host whose A record is missing or not yet published; that is
        fixed at the recipient's end, other MX hosts may still work, and the
        queue lifetime bounds the retries. (Postfix defers likewise.)

        cached_only: NotCached unless the cache answers for both families (the delivery loop
        asks so, and asks again from a pool thread).
        """
        name = a_label(host)
        found, error = self._address_records(name, cached_only)
        if found:
            return found
        if error is not None:
            raise error
        raise DnsError(f"host {name} has no A or AAAA record", "4.4.4")

    def mx_hosts_cached(self, domain: str) -> bool:
        """Whether mx_hosts(domain) would answer from the cache (a domain without MX records
        needs its addresses too)."""
        try:
            name = a_label(domain)
        except DnsError:
            return True  # mx_hosts() fails at once
        found = self.peek(name, dns.rdatatype.MX)
        return found is not None and (found[0] != NODATA or self.addresses_cached(name))

    def addresses_cached(self, host: str) -> bool:
        """Whether addresses(host) would answer from the cache, without waiting for DNS."""
        name = a_label(host)
        return all(self.peek(name, rdtype) is not None for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA))

    def destination(self, domain: str) -> tuple[str, ...]:
        """Key for per-destination limits: domains with the same MX hosts share one."""
        return tuple(sorted(set(self.mx_hosts(domain))))

    def _address_records(self, name: str, cached_only: bool = False) -> tuple[list[str], DnsError | None]:
        """(addresses, transient error or None); one failed family does not hide the other."""
        types = [dns.rdatatype.A, dns.rdatatype.AAAA]
        if self._prefer_ipv6:
            types.reverse()
        found: list[str] = []
        error = None
        for rdtype in types:
            try:
                status, records = self.lookup(name, rdtype, cached_only)
            except DnsError as exc:
                error = exc
                continue
            if status == OK:
                found.extend(records)
        return found, error
