"""Rate limits the admin writes as rules: at most `limit` messages (or recipients) per `window`
seconds per client address, sender, sender domain, recipient domain or login.

Each rule is one api.RateLimit (the core's token bucket, bounded to max_keys keys), so a
rule allows a burst of `limit` and then limit/window per second on average.  A refusal is a
450 4.7.1 (RFC 3463: not authorized, for now) that names the rule and says when to retry:
the client keeps the mail, nothing is lost, and the admin of a legitimate sender can tell
which rule to raise.

When things are counted:
  - "messages" rules keyed by ip, sender, sender_domain or user at MAIL FROM;
  - "recipients" rules at each RCPT TO;
  - recipient_domain rules at RCPT TO: "recipients" counts each recipient of the domain,
    "messages" counts a message once for each of its recipient domains.
All the rules of a command are checked before any is counted, so a command refused by one
rule costs the client nothing against the others.  The null sender (bounces) has no sender
or sender domain, and a client that did not log in has no user: such rules do not apply.

Counters live in the memory the SMTP worker processes share (Services.rate_limit, as the
core's [limits] do), so a rule holds for all workers together. Where elemta gives no shared
memory (a plugin run on its own), each process counts alone with an even share of each limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from elemta.plugins import api

KEYS = ("ip", "sender", "sender_domain", "recipient_domain", "user")
COUNTS = ("messages", "recipients")
RULE_KEYS = ("key", "limit", "window", "count")


@dataclass(frozen=True)
class Rule:
    index: int
    key: str
    limit: int
    window: float
    count: str
    table: api.RateLimit

    def describe(self) -> str:
        # "100 messages per 3600 seconds per sender domain"
        return f"{self.limit} {self.count} per {self.window:g} seconds per {self.key.replace('_', ' ')}"


class RatelimitPlugin(api.Plugin):
    default_timeout: ClassVar[float] = 0.0  # in the session's thread: in memory, no I/O
    options: ClassVar[dict[str, Any]] = {
        "rules": [],  # [{key = "sender", limit = 100, window = 3600, count = "messages"}, ...]
        "max_keys": 100_000,  # keys tracked per rule (the least loaded go first when full)
        "skip_trusted": True,  # clients in smtp.trusted_networks are not limited
    }

    def __init__(self, name: str, *, now: Callable[[], float] = time.monotonic):
        super().__init__(name)
        self.now = now  # the rules' clock; tests pass a fake one
        self._make: Callable[..., api.RateLimit] = api.RateLimit  # per process until start()
        self.configure(dict(self.options))

    def configure(self, options: dict) -> None:
        o = {**self.options, **options}
        max_keys = o["max_keys"]
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise api.PluginError(f"max_keys: must be a whole number >= 1, not {max_keys!r}")
        if not isinstance(o["skip_trusted"], bool):
            raise api.PluginError("skip_trusted: must be true or false")
        if not isinstance(o["rules"], list):
            raise api.PluginError("rules: must be a list of tables {key = ..., limit = ..., window = ..., count = ...}")
        self.rules = tuple(self._rule(index, table, max_keys) for index, table in enumerate(o["rules"]))
        self.skip_trusted = o["skip_trusted"]
        self._options = o

    def start(self, services: api.Services) -> None:
        super().start(services)
        if services.rate_limit is not None:
            self._make, share = services.rate_limit, 1  # the workers count together
        else:
            share = services.workers  # each process counts alone: an even share of each limit
        options = self._options
        self.rules = tuple(
            self._rule(r.index, {**options["rules"][r.index], "limit": -(-r.limit // share)}, options["max_keys"])
            for r in self.rules
        )

    def _rule(self, index: int, table, max_keys: int) -> Rule:
        where = f"rules[{index}]"
        api.check_table(where, table, RULE_KEYS)
        key, limit = table.get("key"), table.get("limit")
        window, count = table.get("window", 3600), table.get("count", "messages")
        if key not in KEYS:
            raise api.PluginError(f"{where}.key: must be one of {', '.join(KEYS)}, not {key!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise api.PluginError(f"{where}.limit: must be a whole number >= 1, not {limit!r}")
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window < math.inf:
            raise api.PluginError(f"{where}.window: must be a number of seconds above 0, not {window!r}")
        if count not in COUNTS:
            raise api.PluginError(f"{where}.count: must be one of {', '.join(COUNTS)}, not {count!r}")
        # The lambda reads self.now at each call, so a clock set after configure() is used.
        counter = self._make(f"{self.name}.{where}", limit, window, max_keys=max_keys, now=lambda: self.now())
        return Rule(index, key, limit, float(window), count, counter)

    # ---- hooks ------------------------------------------------------------------------------

    def on_mail_from(self, ctx: api.Context) -> api.Verdict | None:
        if self._exempt(ctx):
            return None
        due = [(rule, self._key(rule, ctx)) for rule in self.rules
               if rule.count == "messages" and rule.key != "recipient_domain"]
        return self._count(due)

    def on_rcpt_to(self, ctx: api.Context) -> api.Verdict | None:
        if self._exempt(ctx) or ctx.recipient is None:
            return None
        assert ctx.transaction is not None  # _exempt() passes only commands in a transaction
        counted = ctx.transaction.notes.setdefault(f"{self.name}.domains", set())
        due = []
        for rule in self.rules:
            if rule.key == "recipient_domain" and rule.count == "messages":
                key = self._key(rule, ctx)
                if (rule.index, key) not in counted:  # else this message counted for it already
                    due.append((rule, key))
            elif rule.count == "recipients":
                due.append((rule, self._key(rule, ctx)))
        verdict = self._count(due)
        if verdict is None:
            counted.update((rule.index, key) for rule, key in due
                           if rule.key == "recipient_domain" and rule.count == "messages")
        return verdict

    def _exempt(self, ctx: api.Context) -> bool:
        conn = ctx.connection
        return conn is None or ctx.transaction is None or (self.skip_trusted and conn.trusted)

    def _key(self, rule: Rule, ctx: api.Context) -> str | None:
        """What the rule counts by in this command; None: the rule does not apply."""
        conn, tx = ctx.connection, ctx.transaction
        assert conn is not None and tx is not None  # _exempt() passes only commands in a transaction
        if rule.key == "ip":
            return conn.ip
        if rule.key == "user":
            return conn.user.lower() if conn.user is not None else None
        if rule.key == "sender":
            return tx.sender.lower() or None
        if rule.key == "sender_domain":
            return tx.sender_domain or None
        recipient = ctx.recipient or ""
        if "@" not in recipient:
            return None  # a bare "postmaster" (RFC 5321 §4.5.1) has no domain
        return recipient.rpartition("@")[2].lower().rstrip(".") or None

    def _count(self, due: list[tuple[Rule, str | None]]) -> api.Verdict | None:
        keyed = [(rule, key) for rule, key in due if key is not None]
        for rule, key in keyed:
            if not rule.table.check(key):
                return self._refusal(rule, key)
        for rule, key in keyed:
            # Another session may have taken the last unit since the check: refuse then too.
            if not rule.table.hit(key):
                return self._refusal(rule, key)
        return None

    def _refusal(self, rule: Rule, key: str) -> api.Verdict:
        wait = max(1, math.ceil(rule.table.retry_after(key)))
        self.log("limited", rule=rule.index, key=rule.key, value=key, retry=wait)
        return api.defer(450, "4.7.1", f"Rate limit {rule.describe()} exceeded, try again in {wait} seconds")
