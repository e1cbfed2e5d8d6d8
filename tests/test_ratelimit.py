"""elemta.ratelimit: token-bucket counters per key, a fake clock instead of sleeps."""

from __future__ import annotations

import math
import sys
import threading

import pytest

from elemta.ratelimit import RateLimit, SharedRateLimit
from elemta.shm import Region
from tests.support import Clock

# The behaviour both kinds share runs against each: in the process, and in shared memory.
both = pytest.mark.parametrize("kind", ["memory", "shared"])


def make(limit=5, window=60.0, kind="memory", **kw) -> tuple[RateLimit | SharedRateLimit, Clock]:
    clock = Clock()
    if kind == "shared":
        return SharedRateLimit(Region(1 << 22), "test", limit, window, now=clock, **kw), clock
    return RateLimit("test", limit, window, now=clock, **kw), clock


@both
def test_allowed_up_to_the_limit_then_refused(kind):
    rl, _ = make(kind=kind, limit=5)
    assert [rl.hit("192.0.2.1") for _ in range(7)] == [True] * 5 + [False] * 2
    assert not rl.check("192.0.2.1")


@both
def test_keys_are_counted_apart(kind):
    rl, _ = make(kind=kind, limit=2)
    assert [rl.hit("a"), rl.hit("a"), rl.hit("a")] == [True, True, False]
    assert [rl.hit("b"), rl.hit("b"), rl.hit("b")] == [True, True, False]
    assert len(rl) == 2


@both
def test_whole_allowance_back_after_a_quiet_window(kind):
    rl, clock = make(kind=kind, limit=5, window=60)
    for _ in range(5):
        rl.hit("k")
    clock.advance(59.9)  # 4.99 of the 5 drained: room for 4, not quite 5
    assert [rl.hit("k") for _ in range(5)] == [True] * 4 + [False]
    clock.advance(60)
    assert [rl.hit("k") for _ in range(6)] == [True] * 5 + [False]


@both
def test_allowance_drains_steadily(kind):
    rl, clock = make(kind=kind, limit=10, window=60)  # one unit per 6 s
    for _ in range(10):
        rl.hit("k")
    clock.advance(30)
    assert [rl.hit("k") for _ in range(6)] == [True] * 5 + [False]
    clock.advance(6)
    assert [rl.hit("k"), rl.hit("k")] == [True, False]


@both
def test_refused_hits_are_not_counted(kind):
    rl, clock = make(kind=kind, limit=3, window=30)  # one unit per 10 s
    for _ in range(3):
        rl.hit("k")
    for _ in range(1000):
        assert not rl.hit("k")  # a client hammering while refused does not dig deeper
    clock.advance(10)
    assert rl.hit("k")


@both
def test_check_counts_nothing(kind):
    rl, _ = make(kind=kind, limit=3)
    assert all(rl.check("k") for _ in range(100))
    assert len(rl) == 0
    assert [rl.hit("k") for _ in range(4)] == [True, True, True, False]


@both
def test_amounts_such_as_octets(kind):
    rl, clock = make(kind=kind, limit=1000, window=60)
    assert rl.hit("sender@example.org", 600)
    assert not rl.check("sender@example.org", 500)
    assert not rl.hit("sender@example.org", 500)
    assert rl.hit("sender@example.org", 400)  # exactly at the limit is allowed
    assert not rl.hit("sender@example.org", 1)
    assert rl.retry_after("sender@example.org", 500) == pytest.approx(30.0)
    clock.advance(30)
    assert rl.hit("sender@example.org", 500)


@both
def test_fractional_amounts(kind):
    rl, _ = make(kind=kind, limit=1, window=1)
    assert [rl.hit("k", 0.25) for _ in range(5)] == [True] * 4 + [False]


@both
def test_amount_over_the_limit_is_never_allowed_and_stores_nothing(kind):
    rl, clock = make(kind=kind, limit=100)
    assert not rl.hit("k", 101)
    assert rl.retry_after("k", 101) == math.inf
    clock.advance(10_000)
    assert not rl.check("k", 101)
    assert len(rl) == 0


@both
def test_zero_amount_is_allowed_and_stores_nothing(kind):
    rl, _ = make(kind=kind, limit=1)
    assert rl.hit("k", 0)
    assert len(rl) == 0
    rl.hit("k")
    assert rl.hit("k", 0)  # even at the limit: it adds nothing
    assert not rl.hit("k")


@both
@pytest.mark.parametrize("amount", [-1, -0.5, math.nan, math.inf])
def test_bad_amounts(amount, kind):
    rl, _ = make(kind=kind)
    for call in (rl.hit, rl.check, rl.retry_after):
        with pytest.raises(ValueError):
            call("k", amount)


@both
def test_retry_after(kind):
    rl, clock = make(kind=kind, limit=4, window=60)  # one unit per 15 s
    assert rl.retry_after("k") == 0.0  # unknown key
    for _ in range(4):
        rl.hit("k")
    assert rl.retry_after("k") == pytest.approx(15.0)
    assert rl.retry_after("k", 2) == pytest.approx(30.0)
    clock.advance(5)
    assert rl.retry_after("k") == pytest.approx(10.0)
    clock.advance(rl.retry_after("k"))  # waiting exactly that long is enough
    assert rl.retry_after("k") == 0.0
    assert rl.hit("k")
    assert not rl.hit("k")
    for amount in (1, 2, 3, 0.7):
        clock.advance(rl.retry_after("k", amount))
        assert rl.hit("k", amount)


@pytest.mark.parametrize("limit", [0, -1, 0.0])
@both
def test_no_limit(limit, kind):
    rl, _ = make(kind=kind, limit=limit, window=0)  # window does not matter then
    assert rl.unlimited
    assert all(rl.hit(f"k{i % 3}", 10**9) for i in range(1000))
    assert rl.check("k", 10**12)
    assert rl.retry_after("k") == 0.0
    assert len(rl) == 0


@pytest.mark.parametrize(("limit", "window", "max_keys"), [
    (5, 0, 10), (5, -1, 10), (5, math.inf, 10), (math.inf, 60, 10), (math.nan, 60, 10), (5, 60, 0),
])
def test_bad_settings(limit, window, max_keys):
    with pytest.raises(ValueError):
        RateLimit("bad", limit, window, max_keys=max_keys)


@both
def test_exact_counts_at_one_instant_despite_inexact_fractions(kind):
    # 1000 per minute is 0.06 s a unit, which binary floats cannot hold exactly; counting in
    # units keeps the 1000th allowed and the 1001st refused.
    for limit, window in [(1000, 60), (10, 1), (3, 0.3), (7, 0.7)]:
        rl, clock = make(kind=kind, limit=limit, window=window)
        clock.t = 1_700_000_000.0  # a wall-clock sized value
        allowed = sum(rl.hit("k") for _ in range(limit + 5))
        assert allowed == limit, (limit, window)


def test_default_clock_is_monotonic_and_needs_no_sleep():
    rl = RateLimit("real", 2, 3600)
    assert [rl.hit("k"), rl.hit("k"), rl.hit("k")] == [True, True, False]
    assert 0 < rl.retry_after("k") <= 1800


@both
def test_clock_stepping_back_grants_nothing(kind):
    rl, clock = make(kind=kind, limit=2, window=60)
    rl.hit("k")
    rl.hit("k")
    clock.advance(-3600)
    assert not rl.hit("k")
    assert rl.retry_after("k") == pytest.approx(30.0)


# ---- bounded memory --------------------------------------------------------------------------


def test_drained_keys_are_dropped_as_hits_go_on():
    rl, clock = make(limit=3, window=60)
    for i in range(100):
        rl.hit(f"old{i}")
    assert len(rl) == 100
    clock.advance(61)  # every old key has drained: it is the same as never seen
    for _ in range(50):
        rl.hit("new")  # each hit drops a couple of drained keys
    assert len(rl) == 1
    assert rl.evicted == 0  # nothing live was lost


def test_max_keys_holds_under_a_million_distinct_keys():
    rl, clock = make(limit=5, window=60, max_keys=1000)
    sizes = []
    for i in range(1_000_000):
        if i % 1000 == 0:
            clock.advance(0.01)  # a flood, all inside one window
        assert rl.hit(f"198.51.{i >> 8 & 255}.{i & 255}/{i}")
        if i % 100_000 == 99_999:
            assert len(rl) == 1000
            # The containers themselves stop growing too (a dict with many deletions
            # could otherwise keep a table sized for its history).
            sizes.append(sys.getsizeof(rl._buckets) + sys.getsizeof(rl._heap))
    assert len(rl._heap) == 1000  # one heap entry per key, never more
    assert max(sizes) == sizes[0]
    assert rl.evicted == 1_000_000 - 1000


def test_heavy_key_survives_a_flood_of_fresh_keys():
    rl, clock = make(limit=10, window=60, max_keys=100)
    for _ in range(10):
        assert rl.hit("spammer@example.com")
    for i in range(100_000):  # an attacker with many addresses, each used once, for 5 s
        if i % 1000 == 0:
            clock.advance(0.05)
        rl.hit(f"203.0.113.{i}")
    assert len(rl) == 100
    assert not rl.hit("spammer@example.com")  # still counted: still refused
    clock.advance(60)
    assert rl.hit("spammer@example.com")


def test_when_full_the_key_nearest_to_empty_goes():
    rl, clock = make(limit=10, window=100, max_keys=3)  # one unit per 10 s
    for key, hits in [("a", 3), ("b", 10), ("c", 1)]:
        for _ in range(hits):
            rl.hit(key)
    clock.advance(5)
    rl.hit("d")  # c (empty in 5 s) goes, not a (25 s) nor b (95 s)
    assert rl.check("c", 10)
    rl.hit("e")  # d goes (empty in 10 s): fresh keys push out fresh keys
    rl.hit("f")  # e goes
    assert rl.evicted == 3
    assert not rl.check("a", 8)  # a keeps its 2.5
    assert not rl.check("b")  # and b its 9.5
    assert rl.check("d", 10) and rl.check("e", 10)


def test_a_key_hit_again_moves_back_in_the_eviction_order():
    rl, _ = make(limit=10, window=100, max_keys=2)
    rl.hit("a")
    rl.hit("b")
    for _ in range(5):
        rl.hit("a")  # a is now the heavier one; its old heap place is stale
    rl.hit("c")  # so b goes
    assert not rl.check("a", 5)  # a kept its 6
    assert rl.check("b", 10)


def test_evicting_the_whole_table_costs_a_full_table_of_heavy_keys():
    # The documented price: to push a key out, fill the table with keys loaded at least as much.
    rl, clock = make(limit=10, window=60, max_keys=50)
    for _ in range(10):
        rl.hit("victim")
    clock.advance(1)
    for i in range(49):
        for _ in range(10):
            rl.hit(f"attacker{i}")
    assert not rl.check("victim")  # a full table, the victim still in it
    rl.hit("one-more")
    assert rl.check("victim")  # now it went: 50 x 10 hits were needed


# ---- threads ---------------------------------------------------------------------------------


@both
def test_threads_hitting_one_key_count_exactly(kind):
    rl, _ = make(kind=kind, limit=1000, window=60)
    threads, per_thread = 8, 500
    start = threading.Barrier(threads)
    allowed = [0] * threads

    def worker(n: int) -> None:
        start.wait()
        allowed[n] = sum(rl.hit("shared") for _ in range(per_thread))

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sum(allowed) == 1000


def test_threads_with_many_keys_and_evictions():
    rl, _ = make(limit=3, window=60, max_keys=64)
    threads = 8
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        start.wait()
        try:
            for i in range(5000):
                rl.hit(f"{n}-{i % 200}")
                rl.check(f"{n}-{i % 7}")
                rl.retry_after(f"{n}-{i % 11}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    assert len(rl) <= 64
    assert len(rl._heap) == len(rl)


def test_charge_counts_past_the_limit_and_the_key_then_waits_to_drain():
    clock = [0.0]
    limit = RateLimit("octets", 1000, 3600, now=lambda: clock[0])
    assert limit.hit("ip", 900)
    limit.charge("ip", 5000)  # a message already received: counted in full
    assert not limit.check("ip", 1)
    clock[0] += 3600 * 4.9  # 5,900 units drain at 1000/hour: not yet below the limit
    assert not limit.check("ip", 1)
    clock[0] += 3600 * 0.2
    assert limit.check("ip", 1)
    limit.charge("new", 10)
    assert len(limit) == 2
