"""TLSA records through a validating resolver the admin trusts (RFC 7672 §2.1), and whether
the answer was authenticated.

elemta does not validate DNSSEC itself: like Postfix, it asks a resolver that validates (a
local unbound, say) with the AD bit set and DO in EDNS, and believes the AD bit in the reply
only because the admin named that resolver.  The answer is:

- secure: authenticated; its records may be none (an authenticated NXDOMAIN or NODATA);
- insecure: answered without AD (an unsigned zone): no DANE for this host;
- failed: no usable answer (a bogus signature makes a validating resolver answer SERVFAIL, or
  it is unreachable): RFC 7672 §2.1.1, the host must not be used until it can be checked.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver

from elemta import dnscache
from elemta.delivery.dane import DaneCheck, Tlsa, tlsa_name, usable

SECURE, INSECURE, FAILED = "secure", "insecure", "failed"
# Answers are kept for their TTL, within these bounds (a failure for the shortest): the resolver
# caches too, but every MX delivery asks two or three of these questions.
MIN_TTL, MAX_TTL, MAX_ENTRIES = 5.0, 3600.0, 10_000


@dataclass(frozen=True)
class TlsaAnswer:
    state: str  # secure, insecure or failed
    records: tuple[Tlsa, ...] = ()
    text: str = ""  # what happened, for the log and route explain


def trusted(nameservers: Sequence[str]) -> bool:
    """Whether the resolvers delivery asks (these, or /etc/resolv.conf's) are all on this host,
    where their AD bit can be believed: across a network anyone on the path could set it."""
    try:
        addresses = [str(a) for a in dnscache.dns_resolver(nameservers, 1.0).nameservers]
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:  # no resolver at all, or one that is not an address
        return False


class TlsaLookup:
    def __init__(self, nameservers: Sequence[str], *, timeout: float = 10.0):
        resolver = dnscache.dns_resolver(nameservers, timeout)
        # RFC 6840 §5.7: AD in the query asks for the AD bit in the reply; DO (RFC 3225) for the
        # DNSSEC records, which a validating resolver needs to have checked.
        resolver.flags = dns.flags.RD | dns.flags.AD
        resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver = resolver
        self._clock: Callable[[], float] = time.monotonic
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], tuple[float, TlsaAnswer]] = OrderedDict()

    def _cached(self, key: tuple[str, str], ask: Callable[[], tuple[TlsaAnswer, float]]) -> TlsaAnswer:
        now = self._clock()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry[0] > now:
                return entry[1]
        value, ttl = ask()
        with self._lock:
            self._cache[key] = (now + min(max(ttl, MIN_TTL), MAX_TTL), value)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_ENTRIES:
                self._cache.popitem(last=False)
        return value

    def secure(self, name: str, rdtype: str) -> bool:
        """Whether name's rdtype answer (records or their absence) is authenticated (RFC 7672
        §2.2.1: DANE needs the MX RRset secure; §2.2.2: the MX host's addresses too)."""
        return self._cached((name.lower(), rdtype), lambda: self._ask(name, rdtype)).state == SECURE

    def tlsa(self, host: str, port: int = 25) -> TlsaAnswer:
        name = tlsa_name(host, port)
        return self._cached((name, "TLSA"), lambda: self._ask(name, "TLSA"))

    def _ask(self, name: str, rdtype: str) -> tuple[TlsaAnswer, float]:
        """The answer's state and records (TLSA records parsed), and how long it may be kept."""
        try:
            answer = self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            response = exc.response(exc.qnames()[0]) if exc.qnames() else None
            secure = response is not None and bool(response.flags & dns.flags.AD)
            return TlsaAnswer(SECURE if secure else INSECURE, (), f"{name}: no such name"), MIN_TTL
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.NoAnswer) as exc:
            return TlsaAnswer(FAILED, (), f"{name}: {str(exc)[:160] or type(exc).__name__}"), MIN_TTL
        if not answer.response.flags & dns.flags.AD:
            return TlsaAnswer(INSECURE, (), f"{name}: not authenticated (no AD bit)"), _ttl(answer)
        records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer.rrset or ()
                        if r.rdtype == dns.rdatatype.TLSA)
        return TlsaAnswer(SECURE, records, f"{name}: {len(records)} record(s), authenticated"), _ttl(answer)


def _ttl(answer: dns.resolver.Answer) -> float:
    return float(answer.rrset.ttl) if answer.rrset is not None else MIN_TTL


def host_check(lookup: TlsaLookup, host: str, port: int = 25) -> tuple[DaneCheck | None, str]:
    """What DANE says of one host, an MX host of a domain whose MX records are authenticated
    or one the config names: (the check its TLS must pass, or None for no DANE; why the host
    must be skipped, or "").  A check without records means TLS is mandatory but not checked
    (RFC 7672 §2.2)."""
    if not (lookup.secure(host, "A") or lookup.secure(host, "AAAA")):
        return None, ""  # §2.2.2: TLSA only for a host whose addresses are authenticated
    answer = lookup.tlsa(host, port)
    if answer.state == FAILED:
        return None, f"DANE: the TLSA lookup failed ({answer.text}); the host is not used"
    if answer.state != SECURE or not answer.records:
        return None, ""  # insecure, or an authenticated absence: no DANE for this host
    return DaneCheck(tuple(usable(answer.records)), host, (host,)), ""
