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
from elemta.delivery.tls_decision import PUBLISHED, Plan, make_plan
from elemta.transport import is_ip


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
    if route.path:
        out["hosts"] = [{"host": "localhost", "addresses": [f"unix:{route.path}"], "tls": "none",
                         "why": "a unix socket: no TLS"}]
        return out
    out["tls_policy"] = route.tls_policy
    sts_info: dict[str, Any] = {}
    dane_off = "delivery.dane is off" if not d.dane else "a resolver is not on this host: its AD bit is not trusted"
    plan = make_plan(route, domain, mx_secure=(lambda name: dane.secure(name, "MX")) if dane else None,
                     dane_off=dane_off, sts=_cached_policy(cache, resolver, now, sts_info) if d.mta_sts else None)
    if route.mx:
        out["mta_sts"] = _mta_sts_summary(route, plan, sts_info)
    if route.tls_policy in PUBLISHED:
        out["dane"] = _dane_summary(route, plan, domain)
    out["hosts"] = [_host(route, host, resolver, plan, dane) for host in route.hosts]
    return out


def _dane_summary(route: Route, plan: Plan, domain: str) -> dict[str, Any]:
    if not plan.asks_dane:
        return {"applies": False, "why": plan.dane_off.removeprefix("DANE is not used: ")}
    return {"applies": True, "why": f"the MX records of {domain} are authenticated" if route.mx
            else "the host is named by the config (RFC 7672 §2.2.3: its own name is the TLSA base domain)"}


def _mta_sts_summary(route: Route, plan: Plan, info: dict[str, Any]) -> dict[str, Any]:
    if route.tls_policy not in PUBLISHED:
        return {"applies": None, "why": f"the domain's TLS policy ({route.tls_policy}) is fixed by the config"}
    if route.tls_policy == "dane-only":
        return {"applies": None, "why": "the domain's TLS policy is dane-only"}
    if not info:  # the lookup was not made: MTA-STS is off
        return {"applies": None, "why": plan.sts_why}
    return info


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


def _cached_policy(cache: PolicyCache, resolver: Resolver, now: float, info: dict[str, Any]):
    """The MTA-STS lookup explain makes: the policy cached now (nothing is fetched), with what
    was found written into info for the output."""
    def lookup(domain: str) -> tuple[mtasts.Policy | None, str]:
        try:
            record = mtasts.parse_record(resolver.txt(f"_mta-sts.{domain}"))
        except DnsError as exc:
            record, text = None, f"lookup failed: {exc.text}"
        else:
            text = f"id={record.id}" if record else "none"
        cached = cache.get(domain)
        policy = mtasts.applicable(cached, now)
        info.update(record=text, applies=policy.mode if policy is not None else None,
                    fetch_at_next_delivery=mtasts.needs_fetch(cached, record, now) and cache.may_fetch(domain, now))
        if cached is not None:
            info["cached"] = {"id": cached.id, "mode": cached.policy.mode, "mx": list(cached.policy.mx),
                              "max_age": cached.policy.max_age, "fetched": cached.fetched, "expires": cached.expires}
        failure = cache.last_failure(domain)
        if failure is not None:
            info["last_fetch_failure"] = {"at": failure[0], "reason": failure[1]}
        return policy, "no policy cached" if cached is None else "cached"
    return lookup


def _host(route: Route, host: str, resolver: Resolver, plan: Plan, dane: TlsaLookup | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"host": host}
    try:
        entry["addresses"] = [host] if is_ip(host) else resolver.addresses(host)
    except DnsError as exc:
        entry.update(addresses=[], error=exc.text)
    checked = None
    if plan.asks_dane and dane is not None and not is_ip(host):  # as attempt.py asks
        checked = dane_dns.host_check(dane, host, 25 if route.mx else route.port)
    tls = plan.host(host, checked)
    if tls.skip:
        return entry | {"tls": "skipped", "why": tls.skip}
    if tls.testing:  # delivered as may; what enforce would find is reported
        return entry | {"tls": "may", "why": f"MTA-STS: {tls.why}"}
    if tls.dane is not None:
        return entry | {"tls": "dane", "tlsa": [str(r) for r in tls.dane.records], "why": f"DANE: {tls.why}"}
    return entry | {"tls": tls.policy, "why": f"{tls.source}: {tls.why}" if tls.source else tls.why}
