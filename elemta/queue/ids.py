"""Queue IDs: fixed-width, time-ordered, never reused.

An ID is a 64-bit integer written as 13 Crockford base32 digits:

    bits 63..10  microseconds since the Unix epoch (54 bits: good until ~2540)
    bits  9..4   sequence within that microsecond (6 bits)
    bits  3..0   worker number (4 bits), so up to 16 processes sharing one
                 database can issue IDs without coordinating

Crockford's alphabet is in ASCII order and the width is fixed, so comparing
two IDs as strings gives the same answer as comparing the integers: sorting
by queue_id is sorting by issue order, and SQL's max(queue_id) is the newest.
It has no I, L, O or U, so IDs read aloud or copied from a log are unambiguous.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
WIDTH = 13  # ceil(64 / 5)
WORKER_BITS = 4
SEQ_BITS = 6
MAX_WORKER = (1 << WORKER_BITS) - 1
# The time and sequence together form one "tick" counter; overflowing the
# sequence simply carries into the microseconds, which keeps things monotonic.
_TICK_LIMIT = 1 << (64 - WORKER_BITS)
_DECODE = {c: i for i, c in enumerate(ALPHABET)}  # read-only lookup table


def encode(value: int) -> str:
    """The 13-character ID text for a 64-bit value."""
    if not 0 <= value < (1 << 64):
        raise ValueError(f"queue ID value {value!r} does not fit in 64 bits")
    digits = []
    for _ in range(WIDTH):
        digits.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(digits))


def decode(qid: str) -> int:
    """The 64-bit value of an ID; ValueError if it is not one this module issues."""
    if not isinstance(qid, str) or len(qid) != WIDTH:
        raise ValueError(f"not a queue ID (want {WIDTH} characters): {qid!r}")
    value = 0
    for ch in qid:
        try:
            value = (value << 5) | _DECODE[ch]
        except KeyError:
            raise ValueError(f"not a queue ID (bad character {ch!r}): {qid!r}") from None
    if value >= (1 << 64):
        raise ValueError(f"not a queue ID (more than 64 bits): {qid!r}")
    return value


def is_valid(qid: object) -> bool:
    try:
        decode(qid)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


class IdGenerator:
    """Issues strictly increasing IDs; safe to share between threads.

    The wall clock only ever pushes IDs forward: if it steps back (NTP, a VM
    restore) the generator keeps counting up from the last ID it issued, and
    from `floor` (the highest ID already in the database) so that a restart
    after a clock step can never reissue or sort before existing IDs.
    """

    def __init__(
        self,
        worker: int = 0,
        floor: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(worker, int) or not 0 <= worker <= MAX_WORKER:
            raise ValueError(f"worker must be an integer 0..{MAX_WORKER}, got {worker!r}")
        self._worker = worker
        self._clock = clock
        self._lock = threading.Lock()
        # The floor's worker bits are dropped: our next tick is above the floor's
        # tick, so our ID is above the floor whatever worker issued it.
        self._last_tick = decode(floor) >> WORKER_BITS if floor is not None else -1

    @property
    def worker(self) -> int:
        return self._worker

    def next(self) -> str:
        now_tick = int(self._clock() * 1_000_000) << SEQ_BITS
        with self._lock:
            tick = now_tick if now_tick > self._last_tick else self._last_tick + 1
            if tick >= _TICK_LIMIT:
                raise ValueError("queue ID space exhausted (clock beyond year ~2540?)")
            self._last_tick = tick
        return encode((tick << WORKER_BITS) | self._worker)
