"""The delivery loop: one thread waits for the replies of every delivery in progress.

A delivery on a blocking socket holds a thread while the server answers, and every reply then
costs a wake-up and a GIL hand-off: draining a queue to one relayhost took some 30 context
switches per message in the pool's threads. Here a delivery is steps (delivery/steps.py), and
whichever thread runs it writes what it can without waiting and, when it must wait for the
server, leaves it to this loop: one epoll for every connection in a transaction. When the
reply is there, the loop runs the delivery on, records its result and starts the next for the
destination, all without a thread switch. What may block (SLOW: a DNS question, a new
connection, QUIT, a Maildir, plugins) goes to the scheduler's pool; its thread runs the steps
on until the next wait, which comes back here.

Waits are timed: a Read by the connection's command timeout for the whole reply (as the
blocking client does), a Write by it for each block of the message that goes (RFC 5321
§4.5.3.2.5), looked at once a second. An expired wait is thrown into the steps as the same
SmtpClientError the blocking client raises, the connection closed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from elemta.delivery.smtp_client import SmtpConnection
from elemta.delivery.steps import SLOW, Read, Steps, Write

SWEEP_INTERVAL = 1.0  # seconds between looks at the waits' deadlines
_ONESHOT = select.EPOLLONESHOT


class Task:
    """One delivery's steps and what to call when they end.

    done(value, error) is called on the thread that ran the last step; it may return the
    next Task to run there (the destination's next delivery)."""

    __slots__ = ("steps", "done", "op", "data", "deadline")

    def __init__(self, steps: Steps[Any], done: Callable[[Any, BaseException | None], Task | None]) -> None:
        self.steps = steps
        self.done = done
        self.op: Read | Write | None = None  # the wait in progress
        self.data: memoryview | None = None  # what is left to write of a Write
        self.deadline = 0.0


class DeliveryLoop:
    def __init__(self, offload: Callable[[Callable[[], None]], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self._offload = offload  # runs a callable on a pool thread
        self._on_error = on_error  # a bug of elemta's (a done() or a resume that raised): the owner logs it
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._waiting: dict[int, Task] = {}  # fd -> the task waiting on it
        self._calls: collections.deque[Task] = collections.deque()  # tasks other threads start here
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop_ident = -1

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="delivery-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread; waits still open are given up and their connections closed
        (their deliveries' leases bring the recipients back)."""
        with self._lock:
            self._stopping = True
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            tasks, self._waiting = list(self._waiting.values()), {}
        for task in tasks:
            conn = task.op.conn if task.op is not None else None
            if isinstance(conn, SmtpConnection):
                conn.lost("stop", ConnectionAbortedError("elemta is stopping"))
        with self._lock:
            self._epoll.close()
            if self._wakeup >= 0:
                os.close(self._wakeup)
                self._wakeup = -1

    def call(self, task: Task) -> None:
        """Start task on the loop thread (from another thread: the scheduler's).  Once the loop
        is stopping, here instead (the scheduler gives a delivery back then, unsent)."""
        with self._lock:
            if not self._stopping:
                self._calls.append(task)
                os.eventfd_write(self._wakeup, 1)
                return
        self.run(task)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # -- running steps, on any thread ----------------------------------------------------------

    def run(self, task: Task | None, value: Any = None, error: BaseException | None = None) -> None:
        """Run task's steps on this thread until they wait (then the loop has them), reach
        SLOW on the loop thread (then a pool thread has them) or end; then what the task's
        done() hands back, and so on."""
        on_loop = threading.get_ident() == self._loop_ident
        while task is not None:
            steps = task.steps
            wrote = None  # the connection a Write just went to: its reply is not there yet
            while True:
                try:
                    op = steps.throw(error) if error is not None else steps.send(value)
                except StopIteration as stop:
                    task = self._done(task, stop.value, None)
                    break
                except BaseException as exc:  # the steps' own failure: done() gets it (and frees its slot)
                    task = self._done(task, None, exc)
                    if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt: still raised
                        raise
                    break
                value = error = None
                if op is SLOW:
                    if on_loop:
                        self._offload(functools.partial(self.run, task))
                        return
                    continue
                try:
                    if isinstance(op, Read):
                        conn = op.conn
                        assert isinstance(conn, SmtpConnection)
                        got = conn.reply_nowait(op.stage, read=conn is not wrote)
                        if isinstance(got, int):
                            self._wait(task, op, got, time.monotonic() + conn.command_timeout)
                            return
                        value, wrote = got, None
                    elif isinstance(op, Write):
                        if not self._write(task, op, memoryview(op.data)):
                            return
                        wrote = op.conn
                except Exception as exc:  # noqa: BLE001 -- thrown into the steps: the call's own raise
                    error = exc
            value = error = None

    def _write(self, task: Task, op: Write, data: memoryview) -> bool:
        """Write what goes now; False when the rest waits for the loop (task then waits)."""
        conn = op.conn
        assert isinstance(conn, SmtpConnection)
        while data:
            sent, wait = conn.send_nowait(data, op.stage)
            data = data[sent:]
            if wait and data:
                task.data = data
                # Each block that goes starts the timeout again (RFC 5321 §4.5.3.2.5).
                self._wait(task, op, wait, time.monotonic() + conn.command_timeout)
                return False
        return True

    def _done(self, task: Task, value: Any, error: BaseException | None) -> Task | None:
        try:
            return task.done(value, error)
        except Exception as exc:  # noqa: BLE001 -- the owner's bug: logged, the loop goes on
            self._on_error(exc)
            return None

    def _wait(self, task: Task, op: Read | Write, events: int, deadline: float) -> None:
        conn = op.conn
        assert isinstance(conn, SmtpConnection) and conn.sock is not None
        fd = conn.sock.fileno()
        task.op, task.deadline = op, deadline
        with self._lock:
            if self._stopping:
                # Past the stop's grace: given up like the waits stop() finds (the lease
                # brings the recipients back at the next start).
                conn.lost(op.stage, ConnectionAbortedError("elemta is stopping"))
                return
            self._waiting[fd] = task
            # After the table: an answer already there fires at once, and the loop must find
            # it. One-shot, and left registered after it fired: the connection's next wait
            # re-arms it with one call; a closed socket leaves the epoll by itself, and its
            # number, when a new connection gets it, is registered again.
            try:
                self._epoll.modify(fd, events | _ONESHOT)
            except FileNotFoundError:
                self._epoll.register(fd, events | _ONESHOT)

    # -- the loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while not self._stopping:
            try:
                events = self._epoll.poll(min(SWEEP_INTERVAL, 0.25))
            except InterruptedError:
                continue
            for fd, _ in events:
                try:
                    if fd == self._wakeup:
                        self._started()
                        continue
                    with self._lock:
                        task = self._waiting.pop(fd, None)
                    if task is not None:
                        self._resume(task)
                except Exception as exc:  # noqa: BLE001 -- a bug of elemta's: logged; the loop goes on
                    self._on_error(exc)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                try:
                    self._sweep(now)
                except Exception as exc:  # noqa: BLE001 -- as above
                    self._on_error(exc)

    def _started(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wakeup)
        while True:
            with self._lock:
                if not self._calls:
                    return
                task = self._calls.popleft()
            try:
                self.run(task)
            except Exception as exc:  # noqa: BLE001 -- a bug of elemta's: logged; the others still start
                self._on_error(exc)

    def _resume(self, task: Task) -> None:
        """The connection task waits on is ready: go on with its Write or Read."""
        op, task.op = task.op, None
        assert op is not None and isinstance(op.conn, SmtpConnection)
        try:
            if isinstance(op, Write):
                data, task.data = task.data, None
                assert data is not None
                if not self._write(task, op, data):
                    return
                got = None
            else:
                got = op.conn.reply_nowait(op.stage)
                if isinstance(got, int):  # part of the reply: the deadline is for all of it
                    self._wait(task, op, got, task.deadline)
                    return
        except Exception as exc:  # noqa: BLE001 -- thrown into the steps, as run() does
            self.run(task, error=exc)
            return
        self.run(task, value=got)

    def _sweep(self, now: float) -> None:
        with self._lock:
            late = [(fd, t) for fd, t in self._waiting.items() if t.deadline <= now]
            for fd, _ in late:
                del self._waiting[fd]
        for _fd, task in late:
            op, task.op = task.op, None
            assert op is not None and isinstance(op.conn, SmtpConnection)
            self.run(task, error=op.conn.lost(op.stage, TimeoutError("timed out")))
