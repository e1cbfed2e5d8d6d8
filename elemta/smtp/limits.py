"""Flood protection for the SMTP listeners: the [limits] of the config over ratelimit.RateLimit.

One Limiter per process, shared by all its sessions; counters live in memory, bounded by
limits.max_tracked keys each.  Clients in smtp.trusted_networks are never asked about (the
callers skip them), as Postfix exempts mynetworks from its anvil limits.  A refusal names the
limit, so the admin of a legitimate client that hits one can tell which; it is always a 4xx:
the client keeps its mail and tries again later, and nothing already accepted is touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from elemta.config import Config
from elemta.ratelimit import RateLimit
from elemta.smtp import replies
from elemta.smtp.context import Client, Guard
from elemta.smtp.replies import Reply

MINUTE, HOUR = 60.0, 3600.0


class Limiter(Guard):
    def __init__(self, config: Config, workers: int = 1, now: Callable[[], float] = time.monotonic):
        lim, smtp = config.limits, config.smtp

        def limit(name: str, count: float, window: float, share: bool = True) -> RateLimit:
            # With several worker processes the kernel spreads one client's connections over
            # them, so each keeps an even share, as with server.max_connections_per_ip.
            per_process = -(-count // workers) if share and count > 0 else count
            return RateLimit(name, per_process, window, max_keys=lim.max_tracked, now=now)

        self.connections = limit("ip_connections_per_minute", lim.ip_connections_per_minute, MINUTE)
        self.ip_messages = limit("ip_messages_per_hour", lim.ip_messages_per_hour, HOUR)
        self.ip_recipients = limit("ip_recipients_per_hour", lim.ip_recipients_per_hour, HOUR)
        self.ip_bytes = limit("ip_bytes_per_hour", lim.ip_bytes_per_hour, HOUR)
        self.sender_messages = limit("sender_messages_per_hour", lim.sender_messages_per_hour, HOUR)
        self.user_messages = limit("user_messages_per_hour", lim.user_messages_per_hour, HOUR)
        self.user_recipients = limit("user_recipients_per_hour", lim.user_recipients_per_hour, HOUR)
        # AUTH failures per address over smtp.auth_lockout: past auth_max_failures, the address
        # may not try again until enough of them have drained (across sessions, so opening a
        # new connection per guess does not help).  Not shared out: guessing is per process.
        self.auth_failures = limit(
            "auth_failures", smtp.auth_max_failures if smtp.auth_lockout else 0,
            smtp.auth_lockout or 1.0, share=False,
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
        command costs the client nothing against the others."""
        checks = [(self.ip_messages, client.ip, 1, "messages per hour from your address")]
        if size:
            checks.append((self.ip_bytes, client.ip, size, "octets per hour from your address"))
        elif not self.ip_bytes.check(client.ip, 1):
            return replies.RATE_LIMITED.format(limit="octets per hour from your address")
        if user is not None:
            checks.append((self.user_messages, user.lower(), 1, "messages per hour for your login"))
        elif sender:
            checks.append((self.sender_messages, sender.lower(), 1, "messages per hour from this sender"))
        for table, key, amount, what in checks:
            if not table.check(key, amount):
                return replies.RATE_LIMITED.format(limit=what)
        for table, key, amount, _ in checks:
            if table is not self.ip_bytes:  # octets are counted when the message is in
                table.hit(key, amount)
        return None

    def rcpt(self, client: Client, user: str | None) -> Reply | None:
        checks = [(self.ip_recipients, client.ip, "recipients per hour from your address")]
        if user is not None:
            checks.append((self.user_recipients, user.lower(), "recipients per hour for your login"))
        for table, key, what in checks:
            if not table.check(key):
                return replies.RCPT_RATE_LIMITED.format(limit=what)
        for table, key, _ in checks:
            table.hit(key)
        return None

    def message(self, client: Client, size: int) -> None:
        self.ip_bytes.charge(client.ip, size)
