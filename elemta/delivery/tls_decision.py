"""Which TLS each host of a route gets, without I/O: the destination's TLS policy, and what the
recipient domain publishes (DANE, MTA-STS), decided per host.  attempt.py delivers by it and
explain.py shows it, so `elemtactl route explain` says what delivery does.

The policies (delivery.tls_policy, tls_policies, relayhost_tls_policy):

- none, may, encrypt, verify: what the admin fixed; nothing the domain publishes changes it.
- dane (the default): opportunistic-plus.  A host with usable, authenticated TLSA records gets
  TLS checked by them alone (RFC 7672 §2.2, §3); one whose records are all unusable gets TLS
  without a check; a failed TLSA lookup skips the host (§2.1.1).  The other hosts of a domain
  that publishes an MTA-STS policy in mode enforce are tried only if the policy names them,
  over TLS verified for that name (RFC 8461 §4.2, §5); DANE goes first (RFC 8461 §2).  Under a
  policy in mode testing the mail goes as under may, but what enforce would have found is
  reported (TLS-RPT): the named hosts are tried with TLS verified first, and again as may if
  that fails.  All else: may.
- dane-only: a host is tried only with usable, authenticated TLSA records; no fallback.
- mta-sts: authenticated TLS required: DANE where the host has usable TLSA records, else the
  domain's MTA-STS policy in mode enforce; a domain without one is not delivered to (deferred).
  On a route whose host the admin named (relayhost, transport), it means verify.

DANE for an MX route needs the MX records authenticated (RFC 7672 §2.2.1); the host named by
a relayhost or a transport comes from the config, which is as trusted as DNSSEC (§2.2.3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from elemta.config import TLS_POLICIES
from elemta.delivery import tlsrpt
from elemta.delivery.dane import DaneCheck
from elemta.delivery.mtasts import Policy
from elemta.delivery.router import Route
from elemta.delivery.tlsrpt import PolicyKey

# What the MTA-STS policy of a domain is now: (the policy to apply, or None; how it was found).
StsLookup = Callable[[str], tuple[Policy | None, str]]

PUBLISHED = ("dane", "dane-only", "mta-sts")  # the policies that look at what the domain publishes

TLS_MEANING = {
    "none": "no STARTTLS",
    "may": "STARTTLS when offered, certificate not checked (opportunistic)",
    "encrypt": "STARTTLS required, certificate not checked",
    "verify": "STARTTLS required, certificate checked for the host name",
}

# RFC 3463: X.7.5 a cryptographic check could not be made (DANE), X.7.4 the security the
# destination requires is not offered (MTA-STS); RFC 8689 registers 5.7.30 "REQUIRETLS support
# required", a message with REQUIRETLS that cannot go on as it asks.
DANE_STATUS, STS_STATUS, REQUIRETLS_STATUS = "4.7.5", "4.7.4", "5.7.30"


@dataclass(frozen=True)
class HostTls:
    """What one host gets: the connection's policy (none, may, encrypt, verify) and the DANE
    check its TLS must pass, or why it is not tried."""

    policy: str = ""
    dane: DaneCheck | None = None
    source: str = ""  # "DANE" or "MTA-STS" when the domain's publication decided, else ""
    why: str = ""
    skip: str = ""  # why the host is not tried; "" = it is
    status: str = ""  # the RFC 3463 status of a skip
    result: str = ""  # what TLS-RPT counts a skip (or a testing host) as: tlsrpt.py's result-type
    testing: bool = False  # MTA-STS mode testing: may, with what enforce would find reported

    @property
    def pool_policy(self) -> str:
        """What tells this host's pooled connections apart from others to it: never reuse one
        made under a weaker decision."""
        return "dane" if self.dane else "sts-testing" if self.testing else self.policy

    @property
    def authenticated(self) -> bool:
        """TLS whose peer is authenticated by what the domain published (DANE, MTA-STS)."""
        return bool(self.dane is not None and self.dane.records) or (self.source == "MTA-STS" and not self.testing)

    @property
    def label(self) -> str:
        """Added to an attempt's TLS field (the client's own says "DANE 3 1 1")."""
        if self.source != "MTA-STS":
            return ""
        return " (MTA-STS testing)" if self.testing else " (MTA-STS enforce)"


@dataclass(frozen=True)
class Plan:
    """One route's inputs to the decision, found by the caller (DNS, the MTA-STS cache).

    policy: the destination's TLS policy; mx: the hosts came from the MX records; dane_off:
    why no host's TLSA records are asked ("" = they are, for host names); sts: the domain's
    policy in mode enforce, or None; sts_why: why there is none (for mta-sts and explain)."""

    policy: str
    mx: bool = False
    dane_off: str = ""
    sts: Policy | None = None
    sts_why: str = ""
    domain: str = ""  # the recipient domain, for TLS-RPT
    sts_testing: Policy | None = None  # the domain's policy in mode testing (reported, not enforced)

    @property
    def asks_dane(self) -> bool:
        """Whether the caller looks up each host's TLSA records (dane_dns.host_check)."""
        return self.policy in PUBLISHED and not self.dane_off

    def host(self, host: str, dane: tuple[DaneCheck | None, str] | None = None) -> HostTls:
        """The decision for host, given what DANE said of it: (check or None, why to skip),
        or None when its records were not asked."""
        if self.policy in TLS_POLICIES:
            return HostTls(self.policy, why=TLS_MEANING[self.policy])
        check, skip = dane or (None, "")
        if skip:
            return HostTls(skip=skip, status=DANE_STATUS, source="DANE", result=tlsrpt.DNSSEC_INVALID)
        if check is not None and check.records:
            return HostTls("verify", check, "DANE",
                           "TLS required, checked by the host's authenticated TLSA records alone")
        if self.policy == "dane-only":
            reason = self.dane_off or (f"{host} has TLSA records, none usable" if check is not None
                                       else f"{host} has no authenticated TLSA records")
            return HostTls(skip=f"DANE required (dane-only): {reason}", status=DANE_STATUS, source="DANE",
                           result=tlsrpt.DANE_REQUIRED)
        if check is not None and self.policy == "dane":  # RFC 7672 §2.2: TLS, not checked
            return HostTls("encrypt", source="DANE", why="TLSA records, none usable: TLS required, not checked")
        if self.sts is not None:
            if not self.sts.allows(host):
                return HostTls(skip=f"MTA-STS: the recipient domain's policy does not name {host} as an MX host",
                               status=STS_STATUS, source="MTA-STS", result=tlsrpt.VALIDATION_FAILURE)
            return HostTls("verify", source="MTA-STS",
                           why="mode enforce: TLS required, certificate checked for this name")
        if self.policy == "mta-sts":
            if not self.mx:
                return HostTls("verify", why="mta-sts on a host the config names: " + TLS_MEANING["verify"])
            return HostTls(skip=f"MTA-STS required (mta-sts): {self.sts_why or 'no policy in mode enforce'}",
                           status=STS_STATUS, source="MTA-STS")
        if self.sts_testing is not None:  # RFC 8461 §5: deliver as without a policy, report
            if not self.sts_testing.allows(host):
                return HostTls("may", source="MTA-STS", testing=True, result=tlsrpt.VALIDATION_FAILURE,
                               why="mode testing: the policy does not name this host (reported, not enforced)")
            return HostTls("verify", source="MTA-STS", testing=True,
                           why="mode testing: TLS verified for this name if it can be, else as may (reported)")
        return HostTls("may", why=TLS_MEANING["may"])

    def report_policy(self, host: str, tls: HostTls) -> PolicyKey:
        """The policy a session with host counts under in the domain's TLS report (RFC 8460
        §4.4): the host's TLSA records, the domain's MTA-STS policy, or none."""
        domain = self.domain
        if tls.source == "DANE":
            return PolicyKey(tlsrpt.TLSA, domain, tuple(map(str, tls.dane.records)) if tls.dane else (), (host,))
        p = self.sts or self.sts_testing
        if tls.source == "MTA-STS" and p is not None:
            lines = ("version: STSv1", f"mode: {p.mode}", *(f"mx: {m}" for m in p.mx), f"max_age: {p.max_age}")
            return PolicyKey(tlsrpt.STS, domain, lines, p.mx)
        return PolicyKey(tlsrpt.NO_POLICY, domain)

    def require_tls(self, host: str, tls: HostTls) -> HostTls:
        """tls for a message with REQUIRETLS (RFC 8689 §4.2.1): only TLS whose peer is
        authenticated by DANE or MTA-STS, or verified for a name the config gives (a relayhost
        or transport with verify: no DNS named it).  Anything else is a permanent refusal of
        the host; a host already skipped keeps its reason."""
        if tls.skip or tls.authenticated or (tls.policy == "verify" and not self.mx):
            return tls
        return HostTls(skip=f"REQUIRETLS: {host} is reached without TLS authenticated by DANE or MTA-STS"
                            f" (TLS policy {self.policy}: {tls.why or 'opportunistic'})", status=REQUIRETLS_STATUS)


def make_plan(route: Route, domain: str, *, mx_secure: Callable[[str], bool] | None, dane_off: str = "",
              sts: StsLookup | None, sts_off: str = "delivery.mta_sts is off") -> Plan:
    """The plan for route to domain, asking only what its policy needs.  mx_secure: whether a
    domain's MX records are authenticated, None when DANE is not used (dane_off says why); sts:
    the domain's MTA-STS policy, None when MTA-STS is off (sts_off says why)."""
    policy = route.tls_policy
    if policy not in PUBLISHED or route.path:
        return Plan(policy, route.mx, domain=domain)
    if mx_secure is None:
        dane_off = f"DANE is not used: {dane_off}"
    elif route.mx and not mx_secure(domain):
        dane_off = f"the MX records of {domain} are not authenticated (DNSSEC)"
    else:
        dane_off = ""
    if not route.mx or policy == "dane-only":
        return Plan(policy, route.mx, dane_off, domain=domain)
    if sts is None:
        return Plan(policy, True, dane_off, None, sts_off, domain=domain)
    found, note = sts(domain)
    if found is not None and found.mode == "enforce":
        return Plan(policy, True, dane_off, found, domain=domain)
    # testing and none: delivered as without a policy; testing's findings go to TLS-RPT
    why = f"policy in mode {found.mode}" if found is not None else note
    testing = found if found is not None and found.mode == "testing" else None
    return Plan(policy, True, dane_off, None, f"{domain}: {why}", domain=domain, sts_testing=testing)
