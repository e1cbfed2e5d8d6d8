"""What delivery would do with mail for a domain, for `elemtactl route explain`: the route, the
destination and its limits, and per host its addresses and the TLS decision, with the reason.

It asks DNS as delivery does and reads the MTA-STS policies the delivery process keeps, but
changes nothing: no policy is fetched here (the daemon fetches when it delivers), so what it
shows is what the next delivery would do with the policy cached now.
"""

from __future__ import annotations

import time
from typing import Any

from elemta.config import Config
from elemta.delivery import dane_dns, mtasts
from elemta.delivery.dane_dns import TlsaLookup
from elemta.delivery.dns import DnsError, Resolver
from elemta.delivery.mtasts_cache import PolicyCache
from elemta.delivery.router import Route, Router
from elemta.transport import is_ip

TLS_MEANING = {
    "none": "no STARTTLS",
    "may": "STARTTLS when offered, certificate not checked (opportunistic)",
    "encrypt": "STARTTLS required, certificate not checked",
    "verify": "STARTTLS required, certificate checked for the host name",
}


def explain(config: Config, resolver: Resolver, cache: PolicyCache, target: str, *,
            now: float | None = None, dane: TlsaLookup | None = None) -> dict[str, Any]:
    """The explanation for target (a domain, or an address for local and alias routing)."""
    now = time.time() if now is None else now
    address = target if "@" in target else f"postmaster@{target}"
    domain = address.rpartition("@")[2].rstrip(".").lower()
    out: dict[str, Any] = {"domain": domain, "address": address}
    try:
        route = Router(config, resolver).route(address, expand=False)
    except DnsError as exc:
        out.update(route="error", why=f"DNS: {exc.text}", status=exc.enhanced)
        return out
    out.update(route=route.via, kind=route.kind, why=_why(route, domain))
    if route.kind == "error":
        out["status"] = route.status
    if route.kind not in ("smtp", "lmtp"):
        return out
    d = config.delivery
    out["destination"] = {
        "key": list(map(str, route.destination[2])) if route.path == "" else route.path,
        "port": route.port,
        "concurrency": int(d.domain_concurrency.get(domain, d.destination_concurrency)),
        "rate": float(d.domain_rate.get(domain, d.destination_rate)),  # starts per second, 0 = none
    }
    sts, policy = _mta_sts(config, route, cache, domain, resolver, now)
    if sts is not None:
        out["mta_sts"] = sts
    use_dane = _dane(config, route, domain, dane, out)
    out["hosts"] = [_host(route, host, resolver, policy, dane if use_dane else None)
                    for host in (route.hosts or ("localhost",))]
    return out


def _dane(config: Config, route: Route, domain: str, dane: TlsaLookup | None, out: dict[str, Any]) -> bool:
    """Whether DANE is looked at for this route's hosts, with the reason in out["dane"]."""
    if not route.mx:
        return False
    if not config.delivery.dane:
        why = "delivery.dane is off"
    elif dane is None:
        why = "a resolver is not on this host: its AD bit is not trusted"
    elif not route.opportunistic_mx:
        why = f"the domain's own TLS policy ({route.tls_policy}) is kept"
    elif not dane.secure(domain, "MX"):
        why = f"the MX records of {domain} are not authenticated (DNSSEC)"
    else:
        out["dane"] = {"applies": True, "why": f"the MX records of {domain} are authenticated"}
        return True
    out["dane"] = {"applies": False, "why": why}
    return False


def _why(route: Route, domain: str) -> str:
    if route.kind == "error":
        return route.text
    if route.kind in ("hold", "discard"):
        return f"transport map: {route.kind}"
    if route.kind == "maildir":
        return f"local domain: Maildir {route.path}"
    if route.path:
        return f"local domain: LMTP over unix:{route.path}"
    if route.mx:
        return f"MX records of {domain}, best first"
    return route.describe()


def _mta_sts(config: Config, route: Route, cache: PolicyCache, domain: str, resolver: Resolver,
             now: float) -> tuple[dict[str, Any] | None, mtasts.Policy | None]:
    """What MTA-STS says for an MX route (as attempt.py decides), and the policy it enforces."""
    if not route.mx:
        return None, None
    if not config.delivery.mta_sts:
        return {"applies": None, "why": "delivery.mta_sts is off"}, None
    if not route.opportunistic_mx:
        return {"applies": None, "why": f"the domain's own TLS policy ({route.tls_policy}) is kept"}, None
    try:
        record = mtasts.parse_record(resolver.txt(f"_mta-sts.{domain}"))
    except DnsError as exc:
        record, lookup = None, f"lookup failed: {exc.text}"
    else:
        lookup = f"id={record.id}" if record else "none"
    cached = cache.get(domain)
    policy = mtasts.applicable(cached, now)
    out: dict[str, Any] = {
        "record": lookup,
        "applies": policy.mode if policy is not None else None,
        "fetch_at_next_delivery": mtasts.needs_fetch(cached, record, now) and cache.may_fetch(domain, now),
    }
    if cached is not None:
        out["cached"] = {"id": cached.id, "mode": cached.policy.mode, "mx": list(cached.policy.mx),
                         "max_age": cached.policy.max_age, "fetched": cached.fetched, "expires": cached.expires}
    failure = cache.last_failure(domain)
    if failure is not None:
        out["last_fetch_failure"] = {"at": failure[0], "reason": failure[1]}
    return out, policy if policy is not None and policy.mode == "enforce" else None


def _host(route: Route, host: str, resolver: Resolver, enforced: mtasts.Policy | None,
          dane: TlsaLookup | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"host": host}
    if route.path:
        return entry | {"addresses": [f"unix:{route.path}"], "tls": "none", "why": "a unix socket: no TLS"}
    try:
        entry["addresses"] = [host] if is_ip(host) else resolver.addresses(host)
    except DnsError as exc:
        entry.update(addresses=[], error=exc.text)
    if dane is not None and not is_ip(host):
        check, skip = dane_dns.host_check(dane, host)  # as attempt.py decides
        if skip:
            return entry | {"tls": "skipped", "why": skip}
        if check is not None and check.records:
            return entry | {"tls": "dane", "tlsa": [str(r) for r in check.records],
                            "why": "DANE: TLS required, checked by the host's authenticated TLSA records alone"}
        if check is not None:
            return entry | {"tls": "encrypt", "why": "DANE: TLSA records, none usable: TLS required, not checked"}
    if enforced is not None:
        if not enforced.allows(host):
            return entry | {"tls": "skipped", "why": "MTA-STS enforce: the policy does not name this host"}
        return entry | {"tls": "verify", "why": "MTA-STS enforce: TLS required, certificate checked for this name"}
    return entry | {"tls": route.tls_policy, "why": TLS_MEANING[route.tls_policy]}
