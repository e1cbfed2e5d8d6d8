"""elemta.shm and SharedRateLimit: counters the worker processes share, in real forked processes."""

from __future__ import annotations

import os
import random
import signal

import pytest

from elemta.ratelimit import SharedRateLimit
from elemta.shm import Counts, Region, RegionFull
from tests.support import Clock


def in_children(count: int, work) -> list[int]:
    """Run work(n) in count forked processes at once; their exit statuses."""
    pids = []
    for n in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = work(n)
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def test_a_table_is_found_again_by_name_and_size():
    region = Region(1 << 20)
    first = region.table("a", 1000)
    assert region.table("a", 1000) == first
    assert region.table("a", 2000) != first  # another size is another table
    assert region.table("b", 1000)[0] != first[0]
    with pytest.raises(RegionFull):
        region.table("huge", 1 << 21)


def test_keys_hash_with_the_regions_secret():
    one, other = Region(4096), Region(4096)
    assert one.key_hash("192.0.2.1") == one.key_hash("192.0.2.1") != 0
    assert one.key_hash("192.0.2.1") != other.key_hash("192.0.2.1")


def test_counts_match_a_plain_model_through_adds_removals_and_a_dead_worker():
    region = Region(1 << 20)
    counts = Counts(region, "connections", capacity=16)  # 64 slots: long probe runs, wrap-around
    model: dict[tuple[int, str], int] = {}
    rng = random.Random(7)
    keys = [f"198.51.100.{n}" for n in range(40)]
    for step in range(20_000):
        worker, key = rng.randrange(4), rng.choice(keys)
        held = model.get((worker, key), 0)
        if held and rng.random() < 0.5:
            counts.add(worker, key, -1)
            model[(worker, key)] = held - 1
        elif sum(model.values()) < 48:  # never more keys in use than the table is sized for
            counts.add(worker, key, +1)
            model[(worker, key)] = held + 1
        if step % 5000 == 4999:
            counts.forget_worker(2)
            model = {k: v for k, v in model.items() if k[0] != 2}
        if step % 97 == 0:
            for probe in keys:
                assert counts.of(probe) == sum(v for (w, k), v in model.items() if k == probe), (step, probe)
            assert counts.total() == sum(model.values())


def test_admit_counts_only_under_both_caps_and_says_which_cap_it_met():
    counts = Counts(Region(1 << 20), "connections", capacity=16)
    model: dict[tuple[int, str], int] = {}
    rng = random.Random(11)
    keys = [f"198.51.100.{n}" for n in range(6)]
    for _ in range(5000):
        worker, key = rng.randrange(3), rng.choice(keys)
        held = model.get((worker, key), 0)
        if held and rng.random() < 0.45:
            counts.add(worker, key, -1)
            model[(worker, key)] = held - 1
            continue
        total = sum(model.values())
        per_key = sum(v for (w, k), v in model.items() if k == key)
        total_cap, key_cap = rng.choice((8, 12, 40)), rng.choice((0, 2, 5))
        expected = "total" if total >= total_cap else "key" if per_key >= key_cap else None
        assert counts.admit(worker, key, total_cap, key_cap) == expected
        if expected is None:
            model[(worker, key)] = held + 1
        assert counts.of(key) == sum(v for (w, k), v in model.items() if k == key)
        assert counts.total() == sum(model.values())
    assert counts.admit(0, None, 10**6, 0) is None  # no key: the total alone
    assert counts.total() == sum(model.values()) + 1


def test_admit_in_separate_processes_lets_exactly_the_cap_in():
    region = Region(1 << 20)
    counts = Counts(region, "connections", capacity=100)

    def work(n: int) -> int:
        region.after_fork()
        admitted = sum(counts.admit(n, "203.0.113.9", 1000, 25) is None for _ in range(40))
        os.write(pipe_w, admitted.to_bytes(4, "little"))
        return 0

    pipe_r, pipe_w = os.pipe()
    assert in_children(4, work) == [0, 0, 0, 0]
    assert sum(int.from_bytes(os.read(pipe_r, 4), "little") for _ in range(4)) == 25
    assert counts.of("203.0.113.9") == 25 == counts.total()


def test_counts_refuse_when_the_table_is_full():
    counts = Counts(Region(1 << 16), "c", capacity=1)  # 16 slots
    for n in range(16):
        counts.add(0, f"k{n}", 1)
    with pytest.raises(RegionFull):
        counts.add(0, "one-more", 1)


def test_workers_in_separate_processes_count_exactly_together():
    region = Region(1 << 22)
    limit = SharedRateLimit(region, "messages", 500, 3600)
    counts = Counts(region, "connections", capacity=100)

    def work(n: int) -> int:
        region.after_fork()
        allowed = sum(limit.hit("203.0.113.9") for _ in range(400))
        for _ in range(150):
            counts.add(n, "203.0.113.9", 1)
        os.write(pipe_w, allowed.to_bytes(4, "little"))
        return 0

    pipe_r, pipe_w = os.pipe()
    assert in_children(3, work) == [0, 0, 0]
    allowed = sum(int.from_bytes(os.read(pipe_r, 4), "little") for _ in range(3))
    assert allowed == 500  # 1,200 tries in three processes at once, 500 allowed: no more, no less
    assert counts.of("203.0.113.9") == 450 and counts.total() == 450
    counts.forget_worker(1)
    assert counts.of("203.0.113.9") == 300 and counts.total() == 300


def test_a_worker_killed_while_it_holds_the_lock_blocks_no_one():
    region = Region(1 << 20)
    limit = SharedRateLimit(region, "x", 10, 60, max_keys=100)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        region.after_fork()
        with region:
            os.write(ready_w, b"1")
            signal.pause()  # killed here, the lock held
        os._exit(0)
    assert os.read(ready_r, 1) == b"1"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert limit.hit("key")  # the kernel released the dead process's record lock


def test_a_heavy_key_survives_a_flood_of_fresh_keys_in_its_set():
    clock = Clock()
    limit = SharedRateLimit(Region(1 << 20), "flood", 10, 60, max_keys=800, now=clock)
    for _ in range(10):
        assert limit.hit("spammer@example.com")
    for n in range(100_000):
        if n % 1000 == 0:
            clock.advance(0.05)
        limit.hit(f"203.0.113.{n}")
    assert len(limit) <= 800
    assert not limit.hit("spammer@example.com")  # still counted: still refused
    assert limit.evicted > 0  # fresh keys pushed out fresh keys
    clock.advance(60)
    assert limit.hit("spammer@example.com")


def test_counts_and_limits_survive_a_fork_of_a_new_worker():
    """A restarted worker is forked from the supervisor later: it sees what is counted."""
    region = Region(1 << 20)
    counts = Counts(region, "connections", capacity=10)
    counts.add(0, "192.0.2.7", 1)

    def work(n: int) -> int:
        region.after_fork()
        return 0 if Counts(region, "connections", capacity=10).of("192.0.2.7") == 1 else 1

    assert in_children(1, work) == [0]


def test_count_together_counts_all_or_nothing():
    from elemta.ratelimit import count_together

    clock = Clock()
    region = Region(1 << 22)
    messages = SharedRateLimit(region, "m", 2, 60, max_keys=100, now=clock)
    octets = SharedRateLimit(region, "o", 1000, 60, max_keys=100, now=clock)
    assert count_together(region, [(messages, "ip", 1, 1), (octets, "ip", 600, 0)]) is None
    assert messages.check("ip", 1) and not messages.check("ip", 2)  # one counted
    assert octets.check("ip", 1000)  # checked, not counted
    assert count_together(region, [(messages, "ip", 1, 1), (octets, "ip", 1001, 0)]) == 1
    assert messages.check("ip", 1)  # the refusal counted nothing
    assert count_together(region, [(messages, "ip", 1, 1)]) is None
    assert count_together(region, [(octets, "ip", 1, 0), (messages, "ip", 1, 1)]) == 1
