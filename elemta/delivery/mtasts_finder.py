"""Which MTA-STS policy applies to a domain now (RFC 8461 §5): the TXT record through
elemta's resolver, the policy from the disk cache or fetched again when the rules in mtasts.py
say so, every outcome kept for the log and `elemtactl route explain`.

One fetch per domain at a time: deliveries to the same domain wait for the fetch under way
(and use its result) instead of asking the policy host once each.  The locks are striped (a
fixed set, chosen by the domain's hash), so delivering to a million domains keeps no lock each.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from elemta.delivery import mtasts
from elemta.delivery.dns import Resolver
from elemta.delivery.mtasts import Cached, Policy, PolicyError
from elemta.delivery.mtasts_cache import PolicyCache
from elemta.delivery.mtasts_fetch import FetchError, fetch_policy
from elemta.dnscache import DnsError

LOCK_STRIPES = 64


@dataclass(frozen=True)
class Found:
    policy: Policy | None  # the policy to apply now; None: deliver as without MTA-STS
    cached: Cached | None  # what the cache holds after this lookup
    note: str  # how it was found, for the log: "cached", "fetched", "no policy", "fetch failed: ..."
    failed: str = ""  # a fetch just failed: "fetch" (no policy came) or "invalid" (it was not valid)


class PolicyFinder:
    def __init__(self, cache: PolicyCache, resolver: Resolver, *, ca_file: str | None = None,
                 clock: Callable[[], float] = time.time, port: int = 443,
                 fetch: Callable[..., bytes] = fetch_policy):
        self.cache = cache
        self.resolver = resolver
        self.ca_file = ca_file
        self.clock = clock
        self.port = port  # 443; tests serve the policy host on a loopback port
        self.fetch = fetch
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def find(self, domain: str) -> Found:
        domain = domain.rstrip(".").lower()
        try:
            record = mtasts.parse_record(self.resolver.txt(f"_mta-sts.{domain}"))
        except DnsError:
            record = None  # §5.1: a failed lookup does not end a cached policy
        with self._locks[hash(domain) % LOCK_STRIPES]:
            now = self.clock()
            cached = self.cache.get(domain)
            note = "cached" if cached is not None else "no policy"
            failed = ""
            if mtasts.needs_fetch(cached, record, now) and self.cache.may_fetch(domain, now):
                assert record is not None  # needs_fetch() asks for a fetch only with a record
                try:
                    addresses = self.resolver.addresses(f"mta-sts.{domain}")
                    body = self.fetch(domain, addresses, port=self.port, ca_file=self.ca_file)
                    cached = Cached(mtasts.parse_policy(body), record.id, now)
                except (FetchError, PolicyError, DnsError) as exc:
                    note = f"fetch failed: {exc}"
                    failed = "invalid" if isinstance(exc, PolicyError) else "fetch"
                    self._keep(self.cache.fetch_failed, domain, now, str(exc))
                else:
                    note = "fetched" if self._keep(self.cache.put, domain, cached) else "fetched, not kept on disk"
        return Found(mtasts.applicable(cached, now), cached, note, failed)

    def close(self) -> None:
        self.cache.close()

    @staticmethod
    def _keep(write: Callable[..., None], *args: object) -> bool:
        """Write to the cache; a failed write (a full disk) must not stop this delivery, which
        applies what was fetched all the same."""
        try:
            write(*args)
        except sqlite3.Error:
            return False
        return True
