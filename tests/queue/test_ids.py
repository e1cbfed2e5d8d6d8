import itertools
import threading
import time

import pytest

from elemta.queue import ids
from elemta.queue.ids import IdGenerator
from tests.queue.idparts import id_time, id_worker


class SteppingClock:
    """A wall clock the test moves by hand, including backwards."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_format_fixed_width_uppercase_unambiguous():
    gen = IdGenerator()
    for _ in range(1000):
        qid = gen.next()
        assert len(qid) == ids.WIDTH == 13
        assert qid == qid.upper()
        assert not set(qid) & set("ILOU")
        assert ids.is_valid(qid)


def test_sequential_ids_are_strictly_increasing():
    gen = IdGenerator()
    issued = [gen.next() for _ in range(20000)]
    assert all(a < b for a, b in itertools.pairwise(issued))


def test_string_order_matches_numeric_order():
    values = [0, 1, 31, 32, 1023, 1 << 40, (1 << 63) + 5, (1 << 64) - 1]
    encoded = [ids.encode(v) for v in values]
    assert encoded == sorted(encoded)
    assert [ids.decode(e) for e in encoded] == values


def test_unique_and_per_thread_ordered_under_8_threads():
    gen = IdGenerator()
    results = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def issue(out):
        start.wait()
        for _ in range(10_000):
            out.append(gen.next())

    threads = [threading.Thread(target=issue, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    everything = [qid for out in results for qid in out]
    assert len(everything) == 80_000
    assert len(set(everything)) == 80_000
    for out in results:
        assert all(a < b for a, b in itertools.pairwise(out))


def test_clock_stepping_back_keeps_ids_increasing():
    clock = SteppingClock(1_700_000_000.0)
    gen = IdGenerator(clock=clock)
    first = gen.next()
    clock.now -= 3600  # NTP yanks the clock back an hour
    second = gen.next()
    third = gen.next()
    assert first < second < third
    assert id_time(second) >= id_time(first)


def test_floor_in_the_future_is_respected():
    future = time.time() + 86400
    floor = ids.encode(int(future * 1_000_000) << 10 | 7)  # another worker's ID, a day ahead
    gen = IdGenerator(floor=floor)
    qid = gen.next()
    assert qid > floor
    assert id_time(qid) >= future - 1e-6


def test_floor_in_the_past_does_not_hold_ids_back():
    floor = IdGenerator(clock=lambda: 1_000_000_000.0).next()
    qid = IdGenerator(floor=floor).next()
    assert qid > floor
    assert abs(id_time(qid) - time.time()) < 60


def test_worker_bits_differ_for_the_same_instant():
    clock = SteppingClock(1_700_000_000.0)
    a = IdGenerator(worker=3, clock=clock).next()
    b = IdGenerator(worker=5, clock=clock).next()
    assert a != b
    assert id_worker(a) == 3 and id_worker(b) == 5
    assert id_time(a) == id_time(b) == 1_700_000_000.0


def test_id_time_decodes_issue_time():
    before = time.time()
    qid = IdGenerator().next()
    after = time.time()
    assert before - 1e-6 <= id_time(qid) <= after + 1e-6


@pytest.mark.parametrize("worker", [-1, 16, "1"])
def test_bad_worker_is_refused(worker):
    with pytest.raises(ValueError):
        IdGenerator(worker=worker)


@pytest.mark.parametrize(
    "text", ["", "0123456789AB", "0123456789ABI", "0123456789abc", "G000000000000", None]
)
def test_malformed_ids_are_refused(text):
    assert not ids.is_valid(text)
    with pytest.raises(ValueError):
        ids.decode(text)
