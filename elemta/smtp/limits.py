"""Flood protection for the SMTP listeners: the [limits] of the config over ratelimit.SharedRateLimit.

The counters live in memory all SMTP worker processes share (shm.py), bounded by
limits.max_tracked keys each, so every limit holds for the workers together: a client whose
connections the kernel spreads over four workers gets exactly what one worker would give it.
Clients in smtp.trusted_networks are never asked about (the callers skip them), as Postfix
exempts mynetworks from its anvil limits.  A refusal names the limit, so the admin of a
legitimate client that hits one can tell which; it is always a 4xx: the client keeps its mail
and tries again later, and nothing already accepted is touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from elemta.config import Config
from elemta.ratelimit import SharedRateLimit, count_together
from elemta.shm import Region
from elemta.smtp import replies
from elemta.smtp.context import Client, Guard
from elemta.smtp.replies import Reply

MINUTE, HOUR = 60.0, 3600.0
TABLES = 8  # the SharedRateLimit tables a Limiter makes (for sizing the shared region)


class Limiter(Guard):
    def __init__(self, config: Config, region: Region | None = None, now: Callable[[], float] = time.monotonic):
        """region: the workers' shared memory; None makes a private one (a lone process)."""
        lim, smtp = config.limits, config.smtp
        self.region = region if region is not None else Region(size_for(config))

        def limit(name: str, count: float, window: float) -> SharedRateLimit:
            return SharedRateLimit(self.region, name, count, window, max_keys=lim.max_tracked, now=now)

        self.connections = limit("ip_connections_per_minute", lim.ip_connections_per_minute, MINUTE)
        self.ip_messages = limit("ip_messages_per_hour", lim.ip_messages_per_hour, HOUR)
        self.ip_recipients = limit("ip_recipients_per_hour", lim.ip_recipients_per_hour, HOUR)
        self.ip_bytes = limit("ip_bytes_per_hour", lim.ip_bytes_per_hour, HOUR)
        self.sender_messages = limit("sender_messages_per_hour", lim.sender_messages_per_hour, HOUR)
        self.user_messages = limit("user_messages_per_hour", lim.user_messages_per_hour, HOUR)
        self.user_recipients = limit("user_recipients_per_hour", lim.user_recipients_per_hour, HOUR)
        # AUTH failures per address over smtp.auth_lockout: past auth_max_failures, the address
        # may not try again until enough of them have drained (across sessions and workers, so
        # opening a new connection per guess does not help).
        self.auth_failures = limit(
            "auth_failures", smtp.auth_max_failures if smtp.auth_lockout else 0, smtp.auth_lockout or 1.0,
        )

    # ---- the accept thread ------------------------------------------------------------------

    def connect(self, ip: str) -> Reply | None:
        if self.connections.hit(ip):
            return None
        return replies.CONNECTION_RATE

    # ---- the Guard a Session asks --------------------------------------------------------------

    def auth_locked(self, ip: str) -> bool:
        return not self.auth_failures.check(ip)

    def auth_failed(self, ip: str) -> None:
        self.auth_failures.hit(ip)

    def mail(self, client: Client, sender: str, user: str | None, size: int) -> Reply | None:
        """At MAIL: check every limit first and count only when all allow it, so a refused
        command costs the client nothing against the others; in one pass under the shared
        lock, so no other worker counts in between. Octets are only checked here (the SIZE
        declared, else whether one more fits) and counted when the message is in."""
        octets = (self.ip_bytes, client.ip, size or 1, 0, "octets per hour from your address")
        messages = (self.ip_messages, client.ip, 1, 1, "messages per hour from your address")
        checks = [messages, octets] if size else [octets, messages]
        if user is not None:
            checks.append((self.user_messages, user.lower(), 1, 1, "messages per hour for your login"))
        elif sender:
            checks.append((self.sender_messages, sender.lower(), 1, 1, "messages per hour from this sender"))
        refused = count_together(self.region, [check[:4] for check in checks])
        return None if refused is None else replies.RATE_LIMITED.format(limit=checks[refused][4])

    def rcpt(self, client: Client, user: str | None) -> Reply | None:
        checks = [(self.ip_recipients, client.ip, 1, 1, "recipients per hour from your address")]
        if user is not None:
            checks.append((self.user_recipients, user.lower(), 1, 1, "recipients per hour for your login"))
        refused = count_together(self.region, [check[:4] for check in checks])
        return None if refused is None else replies.RCPT_RATE_LIMITED.format(limit=checks[refused][4])

    def message(self, client: Client, size: int) -> None:
        self.ip_bytes.charge(client.ip, size)


def size_for(config: Config) -> int:
    """Bytes of shared memory a Limiter's tables take."""
    return TABLES * SharedRateLimit.size_for(config.limits.max_tracked)
