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
    canonical: str = ""  # where CNAMEs led the name, if elsewhere (lower case, no final dot)


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
        return self.answer(name, rdtype).state == SECURE

    def answer(self, name: str, rdtype: str) -> TlsaAnswer:
        return self._cached((name.lower(), rdtype), lambda: self._ask(name, rdtype))

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
        # The AD bit covers the whole answer, so a CNAME chain in it is authenticated too.
        canonical = answer.canonical_name.to_text(omit_final_dot=True).lower()
        return TlsaAnswer(SECURE, records, f"{name}: {len(records)} record(s), authenticated",
                          canonical if canonical != name.rstrip(".").lower() else ""), _ttl(answer)


def _ttl(answer: dns.resolver.Answer) -> float:
    return float(answer.rrset.ttl) if answer.rrset is not None else MIN_TTL


def host_check(lookup: TlsaLookup, host: str, port: int = 25) -> tuple[DaneCheck | None, str]:
    """What DANE says of one host, an MX host of a domain whose MX records are authenticated
    or one the config names: (the check its TLS must pass, or None for no DANE; why the host
    must be skipped, or "").  A check without records means TLS is mandatory but not checked
    (RFC 7672 §2.2)."""
    addresses = lookup.answer(host, "A")
    if addresses.state != SECURE:
        addresses = lookup.answer(host, "AAAA")
        if addresses.state != SECURE:
            return None, ""  # §2.2.2: TLSA only for a host whose addresses are authenticated
    # §2.2.3: a host name that is a secure CNAME has its TLSA records at the name it leads to,
    # else at its own name; a DANE-TA certificate may name either (§3.2.2).
    names = (addresses.canonical, host) if addresses.canonical else (host,)
    for base in names:
        answer = lookup.tlsa(base, port)
        if answer.state == FAILED:
            return None, f"DANE: the TLSA lookup failed ({answer.text}); the host is not used"
        if answer.state == SECURE and answer.records:
            return DaneCheck(tuple(usable(answer.records)), base, tuple(dict.fromkeys((host, *names)))), ""
    return None, ""  # insecure, or an authenticated absence: no DANE for this host
