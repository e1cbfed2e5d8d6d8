"""A delivery as a generator of the waits it needs: what lets one event loop run many.

A delivery written as a generator yields, instead of waiting itself:

    Write(conn, data, stage)   send data on conn; resumed with None
    Read(conn, stage)          one reply from conn; resumed with (Reply, lines)
    SLOW                       what follows may block (DNS, a new connection, QUIT): not on a loop

A failed Write or Read is thrown into the generator as the SmtpClientError the blocking call
would have raised (the connection is then closed already).  The code between two yields is
only computation, so whoever drives the generator decides where the waits happen: run() does
them on the calling thread, blocking; delivery/loop.py waits for Reads and Writes on its epoll
and hands the generator to a pool thread at SLOW.  The generator's own code is the same
either way.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from elemta.reply import Reply

T = TypeVar("T")


class Channel(Protocol):
    """What a driver needs of a connection (smtp_client.SmtpConnection)."""

    def write_now(self, data: bytes | memoryview, stage: str) -> None: ...

    def read_now(self, stage: str) -> tuple[Reply, list[tuple[int, bool, str]]]: ...


@dataclass(frozen=True, slots=True)
class Write:
    conn: Channel
    data: bytes | memoryview
    stage: str


@dataclass(frozen=True, slots=True)
class Read:
    conn: Channel
    stage: str


class _Slow:
    def __repr__(self) -> str:
        return "SLOW"


SLOW = _Slow()

Op = Write | Read | _Slow
Steps = Generator[Op, Any, T]


def run(steps: Steps[T]) -> T:
    """Drive steps on this thread, each wait a blocking call; its value, or what it raised."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as stop:
            return stop.value
        value = error = None
        try:
            if isinstance(op, Read):
                value = op.conn.read_now(op.stage)
            elif isinstance(op, Write):
                op.conn.write_now(op.data, op.stage)
        except Exception as exc:  # noqa: BLE001 -- given to the generator, as the call's own raise
            error = exc
