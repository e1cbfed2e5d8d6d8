"""`elemtactl route explain`: how mail for a domain would be delivered now, and why
(delivery/explain.py)."""

from __future__ import annotations

from typing import Any

import click

from elemta.cli.ctlbase import Ctl, json_option, pass_ctl
from elemta.cli.render import Output, local_time


@click.group("route")
def route_group() -> None:
    """Show how mail is routed."""


@route_group.command("explain")
@click.argument("target", metavar="DOMAIN")
@json_option
@pass_ctl
def route_explain(ctl: Ctl, target: str, as_json: bool) -> None:
    """How mail for DOMAIN (or to an ADDRESS, for local users and aliases) would be delivered
    now: the route and why, the destination with its concurrency and rate, each host's
    addresses and TLS decision (DANE: the host's authenticated TLSA records; MTA-STS: the
    record, the cached policy and its expiry).  DNS is asked as delivery asks it; nothing is
    fetched or changed."""
    from elemta.assemble import build_resolver  # imported late: it loads the delivery code
    from elemta.delivery import dane_dns
    from elemta.delivery.explain import explain
    from elemta.delivery.mtasts_cache import PolicyCache

    target = target.strip()
    if not target or target.startswith("@") or target.endswith("@"):
        raise click.UsageError(f"{target!r} is neither a domain nor an address")
    config = ctl.config
    d = config.delivery
    dane = dane_dns.TlsaLookup(d.resolvers, timeout=d.dns_timeout) if d.dane and dane_dns.trusted(d.resolvers) else None
    cache = PolicyCache(config.server.spool_dir, readonly=True)
    try:
        result = explain(config, build_resolver(config), cache, target, dane=dane)
    finally:
        cache.close()
    if as_json:
        Output(True).json(result)
        return
    for line in _lines(result):
        click.echo(line)


def _lines(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['domain']}: {r['route']}: {r['why']}" + (f" ({r['status']})" if "status" in r else "")]
    dest = r.get("destination")
    if dest is not None:
        rate = f"{dest['rate']:g} starts a second" if dest["rate"] else "no rate limit"
        key = ", ".join(dest["key"]) if isinstance(dest["key"], list) else dest["key"]
        lines.append(f"  destination: {key} port {dest['port']}: {dest['concurrency']} at a time, {rate}")
    if "tls_policy" in r:
        lines.append(f"  TLS policy: {r['tls_policy']}")
    if "dane" in r:
        lines.append(f"  DANE: {'applies' if r['dane']['applies'] else 'not applied'}: {r['dane']['why']}")
    sts = r.get("mta_sts")
    if sts is not None:
        if "why" in sts:
            lines.append(f"  MTA-STS: not applied: {sts['why']}")
        else:
            cached = sts.get("cached")
            held = (f"policy {cached['mode']} (id {cached['id']}, mx {', '.join(cached['mx']) or '-'}), fetched "
                    f"{local_time(cached['fetched'])}, expires {local_time(cached['expires'])}"
                    if cached else "no policy cached")
            lines.append(f"  MTA-STS: record {sts['record']}; {held}; applies: {sts['applies'] or 'nothing'}"
                         + ("; fetched at the next delivery" if sts["fetch_at_next_delivery"] else ""))
            failure = sts.get("last_fetch_failure")
            if failure:
                lines.append(f"  MTA-STS: last fetch failed {local_time(failure['at'])}: {failure['reason']}")
    for host in r.get("hosts", []):
        addresses = ", ".join(host["addresses"]) or f"no address ({host.get('error', '?')})"
        lines.append(f"  {host['host']} [{addresses}]: TLS {host['tls']}: {host['why']}")
        lines += [f"    TLSA {record}" for record in host.get("tlsa", [])]
    return lines
