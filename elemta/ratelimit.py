"""In-memory rate limits: at most `limit` events (or octets, or ...) per `window` seconds, per key.

Keys are plain strings (a client IP, a sender, a user); what is counted is the caller's choice:
hit(key) counts one event, hit(key, amount=len(body)) counts octets. RateLimit keeps its counters in the process;
SharedRateLimit (below) keeps the same buckets in memory the SMTP workers share, which is what
the SMTP server's [limits] and the rate-limit plugin use.

The algorithm is a token bucket (the "generic cell rate algorithm" view of it): each key has a
level that rises by `amount` per allowed hit and drains continuously at limit/window per
second; a hit is allowed if it keeps the level at or under `limit`. So:
  - a quiet key may burst up to `limit` at once, and after a full quiet window has its whole
    allowance again; a key that keeps going gets limit/window per second on average;
  - the worst case over any one window is 2 x limit (a full burst, then the window's drain),
    the same bound as fixed windows meeting at a boundary;
  - a key holds two floats and nothing else (no per-event log), and a key whose level has
    drained to zero is exactly the same as a key never seen, so it can be dropped without
    losing anything. (Two fixed windows weighted, the other common approximation, keep
    three numbers and a key stays meaningful for two windows after its last hit.)
Rather than storing a "theoretical arrival time" (one float, but an absolute time whose
rounding grows with the clock's value), the level is kept in the caller's units: counts
made at one instant add up exactly, which the tests rely on.

Memory is bounded by max_keys per limit. Which key goes when the table is full matters: an
attacker with many addresses must not grow memory, and must not be able to push a heavy
sender out of the table cheaply (which would reset that sender's count). So keys leave in
order of the time their bucket would be empty again:
  - keys that are already empty go first (nothing is lost), a couple on every hit, so an idle
    table shrinks by itself;
  - when the table is full of live keys, the one closest to empty goes (the least is lost),
    counted in `evicted` (a sign max_keys is too small).
A flood of fresh keys, each hit once, can therefore only push out each other: a key near its
limit stays until an attacker fills the whole table with keys that are each at least as
loaded, which costs about max_keys x limit hits inside one window. LRU order would do the
opposite: a heavy key that stopped (or was refused) is the least recently used one.

The order is kept in a heap holding one entry per key, (empty_at, key). Allowed hits only
ever move a key's empty_at later, so the heap's value is a lower bound; when an entry comes
to the top it is compared with its key's real empty_at and pushed back down if it moved.
Every hit is O(log n) amortised, under one lock per limit (sessions run in many threads).
"""

from __future__ import annotations

import heapq
import math
import struct
import threading
import time
from collections.abc import Callable

from elemta.shm import Region

# Floats drained over time may miss an exact limit by a rounding error; this much over the
# limit (a billionth of it) still counts as "at the limit".
_SLACK = 1e-9
# Empty keys dropped per hit: more than the one a hit may add, so an idle table shrinks,
# and few enough that no single hit pays for a mass expiry.
_DROP_PER_HIT = 2
# SharedRateLimit: slots per set, and a slot (key hash, level, stamp) as stored.
WAYS = 8
_SLOT = struct.Struct("<Qdd")
_SET = struct.Struct("<" + "Qdd" * WAYS)


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self) -> None:
        self.level = 0.0  # in the caller's units, as of `stamp`
        self.stamp = 0.0


class _Limit:
    """What both kinds share: the settings, checked, and the arithmetic of waiting."""

    def __init__(self, name: str, limit: float, window: float, max_keys: int, now: Callable[[], float]) -> None:
        if math.isnan(limit) or (limit > 0 and not (math.isfinite(limit) and math.isfinite(window) and window > 0)):
            raise ValueError(f"rate limit {name}: need a finite limit and a window of more than 0 seconds")
        if max_keys < 1:
            raise ValueError(f"rate limit {name}: max_keys must be at least 1")
        self.name = name
        self.limit = float(limit)
        self.window = float(window)
        self.max_keys = max_keys
        self._now = now
        self._rate = self.limit / self.window if self.limit > 0 else 0.0  # units drained per second
        self._ceiling = self.limit * (1 + _SLACK)

    @property
    def unlimited(self) -> bool:
        return self.limit <= 0

    def _wait(self, wanted: float) -> float:
        """Seconds until a key at level `wanted` (with the amount asked for) is within the limit."""
        if wanted <= self._ceiling:
            return 0.0
        # Measured to the limit itself, not the rounding slack above it, so that waiting
        # exactly this long is always enough.
        return (wanted - self.limit) / self._rate


class RateLimit(_Limit):
    """At most `limit` units per `window` seconds per key; limit <= 0 means no limit."""

    def __init__(
        self,
        name: str,
        limit: float,
        window: float,
        *,
        max_keys: int = 100_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, limit, window, max_keys, now)
        self.evicted = 0  # live keys dropped because the table was full
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._heap: list[tuple[float, str]] = []  # (empty_at lower bound, key), one per key

    def hit(self, key: str, amount: float = 1.0) -> bool:
        """Count `amount` for key if that stays within the limit: True. Else False, not counted."""
        _check_amount(amount)
        if self.unlimited:
            return True
        with self._lock:
            now = self._now()
            self._drop_empty(now, _DROP_PER_HIT)
            bucket = self._buckets.get(key)
            level = self._level(bucket, now)
            if level + amount > self._ceiling:
                return False
            if amount == 0:
                return True  # nothing to count: a refusal-free no-op, and no key is stored
            self._add(key, bucket, level + amount, now)
            return True

    def charge(self, key: str, amount: float) -> None:
        """Count amount whatever the level: for what has already happened (the octets of a
        message received), so the key is refused until it drains below the limit again."""
        _check_amount(amount)
        if self.unlimited or amount == 0:
            return
        with self._lock:
            now = self._now()
            self._drop_empty(now, _DROP_PER_HIT)
            bucket = self._buckets.get(key)
            self._add(key, bucket, self._level(bucket, now) + amount, now)

    def _add(self, key: str, bucket: _Bucket | None, level: float, now: float) -> None:
        """Set key's level (under the lock); a new key may push the emptiest one out."""
        if bucket is None:
            while len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = self._buckets[key] = _Bucket()
            bucket.level, bucket.stamp = level, now
            heapq.heappush(self._heap, (self._empty_at(bucket), key))
        else:
            bucket.level, bucket.stamp = level, now

    def check(self, key: str, amount: float = 1.0) -> bool:
        """Would hit(key, amount) be allowed now? Counts nothing."""
        _check_amount(amount)
        if self.unlimited:
            return True
        with self._lock:
            return self._level(self._buckets.get(key), self._now()) + amount <= self._ceiling

    def retry_after(self, key: str, amount: float = 1.0) -> float:
        """Seconds until hit(key, amount) would be allowed: 0 if now, inf if never (amount > limit)."""
        _check_amount(amount)
        if self.unlimited:
            return 0.0
        if amount > self._ceiling:
            return math.inf
        with self._lock:
            return self._wait(self._level(self._buckets.get(key), self._now()) + amount)

    def __len__(self) -> int:
        """Keys held (some may have drained and wait to be dropped)."""
        return len(self._buckets)

    def __repr__(self) -> str:
        return f"RateLimit({self.name!r}, {self.limit:g} per {self.window:g}s, {len(self)} keys)"

    # ---- internals (called with the lock held) --------------------------------------------

    def _level(self, bucket: _Bucket | None, now: float) -> float:
        if bucket is None:
            return 0.0
        # A clock that steps back (only an injected one can) drains nothing rather than refilling.
        elapsed = max(0.0, now - bucket.stamp)
        return max(0.0, bucket.level - elapsed * self._rate)

    def _empty_at(self, bucket: _Bucket) -> float:
        return bucket.stamp + bucket.level / self._rate

    def _pop_lowest(self) -> tuple[float, str]:
        """The key that will be empty first (and when), out of the heap but still in the table."""
        while True:
            listed, key = self._heap[0]
            actual = self._empty_at(self._buckets[key])
            if actual <= listed:
                heapq.heappop(self._heap)
                return actual, key
            heapq.heapreplace(self._heap, (actual, key))  # it was hit since: back to its place

    def _drop_empty(self, now: float, budget: int) -> None:
        while budget > 0 and self._heap and self._heap[0][0] <= now:
            budget -= 1
            listed, key = self._heap[0]
            actual = self._empty_at(self._buckets[key])
            if actual > listed:
                heapq.heapreplace(self._heap, (actual, key))
                continue
            heapq.heappop(self._heap)
            del self._buckets[key]

    def _evict(self, now: float) -> None:
        empty_at, key = self._pop_lowest()
        del self._buckets[key]
        if empty_at > now:
            self.evicted += 1


class SharedRateLimit(_Limit):
    """RateLimit's buckets in memory the worker processes share (shm.py), so one limit holds
    for all of them together: the same methods and the same arithmetic.

    The table cannot keep a heap across processes, so it is set-associative: a key's hash
    picks a set of WAYS slots, and a new key takes a free or drained slot of its set, or else
    the slot of that set whose bucket will be empty first (counted in `evicted`). Keys hash
    with the region's secret, so a flood of fresh keys lands evenly and, as with the heap,
    only pushes out keys that are less loaded than itself: a key near its limit stays until
    every other key of its set is at least as loaded."""

    def __init__(
        self,
        region: Region,
        name: str,
        limit: float,
        window: float,
        *,
        max_keys: int = 100_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, limit, window, max_keys, now)
        self.region = region
        self.sets = -(-max_keys // WAYS)
        # The table is found by name and size: a reload that keeps them keeps the counts.
        self._base, self._index = region.table(f"rate.{name}", self.size_for(max_keys))

    @staticmethod
    def size_for(max_keys: int) -> int:
        """Bytes a table of max_keys keys takes in a region."""
        return -(-max_keys // WAYS) * _SET.size

    @property
    def evicted(self) -> int:
        return self.region.evicted(self._index)

    def hit(self, key: str, amount: float = 1.0) -> bool:
        _check_amount(amount)
        if self.unlimited:
            return True
        with self.region:
            now = self._now()
            wanted, at, level = self._find(key, now)
            if level + amount > self._ceiling:
                return False
            if amount:
                self._store(wanted, at, level + amount, now)
            return True

    def charge(self, key: str, amount: float) -> None:
        _check_amount(amount)
        if self.unlimited or amount == 0:
            return
        with self.region:
            now = self._now()
            wanted, at, level = self._find(key, now)
            self._store(wanted, at, level + amount, now)

    def check(self, key: str, amount: float = 1.0) -> bool:
        _check_amount(amount)
        if self.unlimited:
            return True
        with self.region:
            return self._find(key, self._now())[2] + amount <= self._ceiling

    def retry_after(self, key: str, amount: float = 1.0) -> float:
        _check_amount(amount)
        if self.unlimited:
            return 0.0
        if amount > self._ceiling:
            return math.inf
        with self.region:
            return self._wait(self._find(key, self._now())[2] + amount)

    def __len__(self) -> int:
        """Keys held, some perhaps drained (a scan of the table: for tests and reports)."""
        with self.region:
            view = self.region.mem[self._base:self._base + self.sets * _SET.size]
        return sum(1 for key_hash, _, _ in _SLOT.iter_unpack(view) if key_hash)

    def __repr__(self) -> str:
        return f"SharedRateLimit({self.name!r}, {self.limit:g} per {self.window:g}s)"

    # ---- the set of a key (called with the region locked) -----------------------------------

    def _find(self, key: str, now: float) -> tuple[int, int | None, float]:
        """(key's hash, offset of its slot or None, its level now)."""
        wanted = self.region.key_hash(key)
        base = self._base + (wanted % self.sets) * _SET.size
        values = _SET.unpack_from(self.region.mem, base)
        try:
            way = values[0::3].index(wanted)  # the hashes of the set's slots
        except ValueError:
            return wanted, None, 0.0
        level, stamp = values[3 * way + 1], values[3 * way + 2]
        return wanted, base + way * _SLOT.size, max(0.0, level - max(0.0, now - stamp) * self._rate)

    def _store(self, wanted: int, at: int | None, level: float, now: float) -> None:
        if at is None:
            at = self._victim(self._base + (wanted % self.sets) * _SET.size, now)
        _SLOT.pack_into(self.region.mem, at, wanted, level, now)

    def _victim(self, base: int, now: float) -> int:
        """The slot a new key takes: a free one, a drained one, else the one empty first."""
        values = _SET.unpack_from(self.region.mem, base)
        best, best_empty_at = 0, math.inf
        for way in range(WAYS):
            key_hash, level, stamp = values[3 * way:3 * way + 3]
            if key_hash == 0:
                return base + way * _SLOT.size
            empty_at = stamp + level / self._rate
            if empty_at < best_empty_at:
                best, best_empty_at = way, empty_at
        if best_empty_at > now:
            self.region.add_evicted(self._index)
        return base + best * _SLOT.size


def count_together(region: Region, items: list[tuple[SharedRateLimit, str, float, float]]) -> int | None:
    """For each (table, key, amount to check, amount to count) of tables in region: if every
    key has room for its amount to check, count every amount to count and return None; else
    return the index of the first that has not, and count nothing. One lookup per key, all
    under the region's lock, so no other worker counts in between."""
    found: list[tuple[int, int | None, float, float] | None] = []
    with region:
        for index, (table, key, check, _) in enumerate(items):
            _check_amount(check)
            if table.unlimited:
                found.append(None)
                continue
            now = table._now()
            wanted, at, level = table._find(key, now)
            if level + check > table._ceiling:
                return index
            found.append((wanted, at, level, now))
        for (table, _, _, count), slot in zip(items, found, strict=True):
            if slot is not None and count:
                _check_amount(count)
                wanted, at, level, now = slot
                table._store(wanted, at, level + count, now)
    return None


def _check_amount(amount: float) -> None:
    # A negative amount would refill a bucket; NaN would compare false and slip through.
    if not (math.isfinite(amount) and amount >= 0):
        raise ValueError(f"rate limit amount must be a finite number >= 0, not {amount!r}")
