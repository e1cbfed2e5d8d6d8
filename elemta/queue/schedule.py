"""When a deferred recipient is tried again, and when its message gives up.

The formula (also in conf/elemta.toml, elemta.toml(5) and docs/delivery.md), for the n-th
failed attempt (n = 1, 2, ...):

    delay(n) = min(retry_max, retry_first * 2 ** (n - 1)) * (1 + retry_jitter * u)

with u drawn uniformly from [-1, 1] for each retry. The jitter spreads retries of mail that
failed together (one remote outage) so they do not return as one burst. With the defaults
(300 s, 3600 s, 0.1) that is about 5, 10, 20, 40 minutes, then hourly. A retry is never
scheduled past the message's expiry (arrival + max_lifetime): the last try happens at expiry,
and a message still undelivered then bounces with status 4.4.7.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from elemta.config import DeliveryConfig

_DEFAULTS = DeliveryConfig()  # the defaults have one home: config/keys.py


@dataclass(frozen=True)
class RetrySchedule:
    first: float = _DEFAULTS.retry_first
    maximum: float = _DEFAULTS.retry_max
    jitter: float = _DEFAULTS.retry_jitter
    lifetime: float = _DEFAULTS.max_lifetime
    delay_warning: float = _DEFAULTS.delay_warning  # 0 = never

    @classmethod
    def from_config(cls, d: DeliveryConfig) -> RetrySchedule:
        return cls(d.retry_first, d.retry_max, d.retry_jitter, d.max_lifetime, d.delay_warning)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1 for the first)."""
        n = max(1, failures)
        # 2 ** 60 is far past any retry_max; the cap keeps the power from growing without end.
        base = min(self.maximum, self.first * 2 ** min(n - 1, 60))
        u = (rng or random).uniform(-1.0, 1.0)
        return base * (1.0 + self.jitter * u)

    def expires_at(self, created: float) -> float:
        return created + self.lifetime

    def expired(self, created: float, now: float) -> bool:
        return now >= self.expires_at(created)

    def next_attempt(self, created: float, failures: int, now: float, rng: random.Random | None = None) -> float:
        """When to try again after a failure at `now`; never later than the expiry time."""
        return min(now + self.delay(failures, rng), max(now, self.expires_at(created)))

    def warn_due(self, created: float, now: float, warned: bool) -> bool:
        """True once per recipient, the first time it is still deferred `delay_warning` after arrival."""
        return bool(self.delay_warning) and not warned and now - created >= self.delay_warning
