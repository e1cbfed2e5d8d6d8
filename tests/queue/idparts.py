"""What a queue ID holds (the layout of elemta/queue/ids.py), read back by the tests only:
elemta itself never needs to take an ID apart."""

from __future__ import annotations

from elemta.queue import ids


def id_time(qid: str) -> float:
    """The Unix time (seconds, microsecond resolution) at which the ID was issued."""
    return (ids.decode(qid) >> (ids.SEQ_BITS + ids.WORKER_BITS)) / 1_000_000


def id_worker(qid: str) -> int:
    """The number of the SMTP worker that issued the ID."""
    return ids.decode(qid) & ids.MAX_WORKER
