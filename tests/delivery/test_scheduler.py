"""delivery/scheduler.py: a slot that frees up starts its destination's next delivery where it is
(the delivery loop's thread, where the reply that ended the last one was read).

A real scheduler (assemble.build_scheduler) delivers through a relayhost to a loopback MX
(tests/mx.py) that holds the first message's DATA until the test lets it go, so the other
deliveries are sure to be waiting for the destination's one slot by then.
"""

from __future__ import annotations

import threading

from elemta.queue.model import NewMessage, NewRecipient
from tests.delivery.test_scheduler_results import GatedHandler, Setup
from tests.mx import Mx
from tests.support import wait_for


def test_the_waiting_deliveries_run_one_after_another_in_the_thread_whose_slot_freed(tmp_path):
    handler = GatedHandler()
    with Mx(handler) as mx:
        s = Setup(tmp_path / "spool", mx, delivery_extra="destination_concurrency = 1\n")
        scheduler, store = s.scheduler, s.store
        threads: list[int] = []
        steps = scheduler.attempter.steps

        def attempt(*args, **kwargs):
            result = yield from steps(*args, **kwargs)
            threads.append(threading.get_ident())  # where the attempt ended
            return result

        scheduler.attempter.steps = attempt  # type: ignore[method-assign]
        handed_off = []
        submit = scheduler._pool.submit

        def pool_submit(fn, *args):
            if args and getattr(args[0], "__name__", "") == "_deliver":
                handed_off.append(args[1])
            return submit(fn, *args)

        scheduler._pool.submit = pool_submit  # type: ignore[method-assign]
        try:
            for i in range(6):
                store.enqueue(NewMessage(store.new_id(), "a@example.org", (NewRecipient(f"r{i}@elsewhere.example"),),
                                         f"Subject: {i}\r\n\r\nbody\r\n".encode()))
            scheduler.start()
            wait_for(lambda: handler.data_started == 1, 10, what="the MX holding the first message's DATA")
            wait_for(lambda: sum(len(d.waiting) for d in scheduler._dest.values()) == 5, 10,
                     what="the five others waiting for the slot")
            handler.gate.set()
            wait_for(lambda: len(handler.received()) == 6, 20, what="six messages at the MX")
            wait_for(lambda: scheduler._jobs == 0, 10, what="every job finished")
        finally:
            s.close()
    # None was handed to another thread: the loop, which read the first one's last reply, ran
    # all six to their end, over the one connection the MX saw.
    assert handed_off == []
    assert len(threads) == 6 and set(threads) == {scheduler.loop._loop_ident}, threads
    assert mx.handler.connections() == 1
    assert sorted(m.rcpt_tos[0] for m in handler.received()) == sorted(f"r{i}@elsewhere.example" for i in range(6))


def test_no_more_deliveries_run_at_once_than_delivery_concurrency(tmp_path):
    """Four messages for one destination that would take twenty: two run, two wait, since
    delivery.concurrency counts deliveries in all, whichever thread or loop they are on."""
    handler = GatedHandler()
    with Mx(handler) as mx:
        s = Setup(tmp_path / "spool", mx, delivery_extra="concurrency = 2\n")
        scheduler, store = s.scheduler, s.store
        try:
            for i in range(4):
                store.enqueue(NewMessage(store.new_id(), "a@example.org", (NewRecipient(f"r{i}@elsewhere.example"),),
                                         f"Subject: {i}\r\n\r\nbody\r\n".encode()))
            scheduler.start()
            wait_for(lambda: handler.data_started == 2, 10, what="two messages' DATA held at the MX")
            wait_for(lambda: sum(len(d.waiting) for d in scheduler._dest.values()) == 2, 10,
                     what="the two others waiting")
            assert handler.data_started == 2 and scheduler._running == 2
            handler.gate.set()
            wait_for(lambda: len(handler.received()) == 4, 20, what="four messages at the MX")
            wait_for(lambda: scheduler._jobs == 0, 10, what="every job finished")
            assert scheduler._running == 0
        finally:
            s.close()


def test_destinations_take_turns_when_delivery_concurrency_holds_mail_back(tmp_path):
    from elemta.delivery.grouping import Delivery
    from elemta.delivery.router import Route
    from elemta.delivery.scheduler import Destination
    from elemta.queue.jobs import Job, Recipient

    with Mx() as mx:
        s = Setup(tmp_path / "spool", mx, delivery_extra="concurrency = 1\n")
        scheduler = s.scheduler
        started: list[str] = []
        scheduler._task = lambda dl: dl  # type: ignore[method-assign]
        scheduler.loop.call = lambda dl: started.append(dl.domain)  # type: ignore[method-assign]
        try:
            for domain in ("a.example", "b.example"):
                route = Route("smtp", (f"mx.{domain}",), 25, tls_policy="none")
                dest = scheduler._dest[route.destination] = Destination(limit=20, interval=0.0)
                for i in range(2):
                    job = Job(f"{domain}-{i}", 0.0, "s@example.org", 1, 1, None, None, "7BIT", False,
                              (Recipient(i, f"r@{domain}", domain, None, (), 0, False, None),), False)
                    dest.waiting.append(Delivery(job, b"x", route, list(job.recipients), domain))
            for _ in range(4):
                scheduler._start_waiting()
                with scheduler._lock:  # the delivery just started ends
                    scheduler._running -= 1
                    for dest in scheduler._dest.values():
                        dest.active = 0
            assert started == ["a.example", "b.example", "a.example", "b.example"]
        finally:
            s.close()


def test_a_delivery_given_back_at_a_stop_counts_once_for_its_message(tmp_path):
    """A message with two deliveries, one of them started as the scheduler stops: it is given
    back unsent, and the message still waits for its other delivery (it once counted twice,
    so a stop could think every delivery had ended while one still ran)."""
    from elemta.delivery.grouping import Delivery
    from elemta.delivery.router import Route
    from elemta.delivery.scheduler import Destination
    from elemta.queue.jobs import Job, Recipient

    with Mx() as mx:
        s = Setup(tmp_path / "spool", mx)
        scheduler = s.scheduler
        try:
            route = Route("smtp", ("mx.a.example",), 25, tls_policy="none")
            job = Job("Q1", 0.0, "s@example.org", 1, 1, None, None, "7BIT", False,
                      (Recipient(1, "r@a.example", "a.example", None, (), 0, False, None),), False)
            dl = Delivery(job, b"x", route, list(job.recipients), "a.example")
            with scheduler._lock:
                scheduler._jobs, scheduler._parts[id(job)] = 1, 2
                scheduler._dest[route.destination] = Destination(limit=20, interval=0.0, active=1)
                scheduler._running = 1
                scheduler._stopping = True
            scheduler.loop.run(scheduler._task(dl))  # on this thread: it gives the delivery back
            assert (scheduler._jobs, scheduler._parts.get(id(job)), scheduler._running) == (1, 1, 0)
        finally:
            scheduler._stopping = False
            s.close()
