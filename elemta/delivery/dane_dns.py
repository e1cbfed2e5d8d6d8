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

from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver

from elemta.delivery.dane import Tlsa, tlsa_name
from elemta.dnscache import parse_nameserver

SECURE, INSECURE, FAILED = "secure", "insecure", "failed"


@dataclass(frozen=True)
class TlsaAnswer:
    state: str  # secure, insecure or failed
    records: tuple[Tlsa, ...] = ()
    text: str = ""  # what happened, for the log and route explain


class TlsaLookup:
    def __init__(self, nameservers: Sequence[str], *, timeout: float = 10.0):
        resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            ports: dict[str, int] = {}
            for entry in nameservers:
                ip, port = parse_nameserver(entry)
                ports[ip] = port
            resolver.nameservers = list(ports)
            resolver.nameserver_ports = ports
        resolver.search = []
        resolver.use_search_by_default = False
        resolver.lifetime = timeout
        resolver.cache = None
        # RFC 6840 §5.7: AD in the query asks for the AD bit in the reply; DO (RFC 3225) for the
        # DNSSEC records, which a validating resolver needs to have checked.
        resolver.flags = dns.flags.RD | dns.flags.AD
        resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver = resolver

    def tlsa(self, host: str, port: int = 25) -> TlsaAnswer:
        name = tlsa_name(host, port)
        try:
            answer = self._resolver.resolve(name, dns.rdatatype.TLSA, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            response = exc.response(exc.qnames()[0]) if exc.qnames() else None
            secure = response is not None and bool(response.flags & dns.flags.AD)
            return TlsaAnswer(SECURE if secure else INSECURE, (), f"{name}: no such name")
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.NoAnswer) as exc:
            return TlsaAnswer(FAILED, (), f"{name}: {str(exc)[:160] or type(exc).__name__}")
        secure = bool(answer.response.flags & dns.flags.AD)
        records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer.rrset or ())
        if not secure:
            return TlsaAnswer(INSECURE, (), f"{name}: not authenticated (no AD bit)")
        return TlsaAnswer(SECURE, records, f"{name}: {len(records)} record(s), authenticated")
