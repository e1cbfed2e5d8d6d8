"""A small queue with one message in each situation elemtactl shows, built through the real
Store (intake) and WorkQueue (delivery) APIs on a fake clock. Used by the queue.admin and the
elemtactl tests."""

from __future__ import annotations

from dataclasses import dataclass

from elemta.queue.jobs import Attempt, Outcome, Result
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.store import Store
from elemta.queue.work import WorkQueue

T0 = 1_700_000_000.0
HOUR = 3600.0
OWNER = "mta.example:100"
BODY = (
    b"Received: from client.example (client.example [192.0.2.7])\r\n"
    b"\tby mx.example (elemta) with ESMTP id X; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"Subject: quarterly\r\n report\r\n"
    b"\r\n"
    b"Body text.\r\nFrom: not a header\r\n"
)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Sample:
    """Oldest first: done (5 h old), deferred (4 h), active (3 h), queued (2 h), held (1 h)."""

    path: str
    clock: Clock
    store: Store
    work: WorkQueue
    done: str  # delivered to its only recipient: final, body dropped
    deferred: str  # bob@example.org deferred after 2 tries, carol@example.net delivered
    active: str  # gina@example.org claimed by the scheduler, mid-delivery
    queued: str  # high priority, DSN parameters, two recipients waiting for their first try
    held: str  # a bounce (sender <>), low priority, held

    @property
    def pending(self) -> list[str]:
        return [self.deferred, self.active, self.queued, self.held]

    def close(self) -> None:
        self.work.close()
        self.store.close()


def enqueue(store: Store, *rcpts, **kw) -> str:
    return store.enqueue(NewMessage(
        queue_id=store.new_id(),
        sender=kw.pop("sender", "alice@example.com"),
        recipients=tuple(NewRecipient(r) if isinstance(r, str) else r for r in rcpts),
        body=kw.pop("body", BODY),
        **kw,
    ))


def build(path: str, start: float = T0) -> Sample:
    """The sample queue; `start` is when the first message arrives (the clock ends 5 hours on)."""
    clock = Clock(start)
    store = Store(path, clock=clock)
    store.open()
    work = WorkQueue(path, OWNER, clock=clock)
    work.open()

    done = enqueue(store, "hank@example.com", client_ip="192.0.2.7", client_helo="client.example")
    (job,) = work.claim(10, 600)
    clock.advance(10)
    work.finish(done, Result([Outcome(job.recipients[0].id, "delivered")],
                             [Attempt(job.recipients[0].id, clock(), "delivered", "250 2.0.0 ok", "mx.example.com",
                                      "192.0.2.25", 25, "TLSv1.3", 0.5)]))
    clock.advance(HOUR - 10)

    deferred = enqueue(store, "bob@example.org", "carol@example.net")
    for later in (600, 10 * HOUR):  # bob is tried twice and due again in 10 hours
        (job,) = work.claim(10, 600)
        bob, *rest = job.recipients
        outcomes = [Outcome(bob.id, "deferred", "451 4.7.1 greylisted", next_attempt=clock() + later)]
        tries = [Attempt(bob.id, clock(), "deferred", "451 4.7.1 greylisted", "mx.example.org", "192.0.2.26", 25,
                         "TLSv1.3", 1.25)]
        if rest:
            outcomes.append(Outcome(rest[0].id, "delivered"))
            tries.append(Attempt(rest[0].id, clock(), "delivered", "250 ok", "mx.example.net", "2001:db8::25", 25,
                                 "", 0.75))
        work.finish(deferred, Result(outcomes, tries))
        if later == 600:
            clock.advance(600)
    clock.advance(HOUR - 600)

    active = enqueue(store, "gina@example.org")
    (job,) = work.claim(10, 600)
    assert job.queue_id == active
    clock.advance(HOUR)

    queued = enqueue(
        store,
        NewRecipient("Frank@Example.NET", orcpt="rfc822;frank@example.net", notify=("SUCCESS", "FAILURE")),
        "ivan@example.org",
        sender="eve@example.com", priority="high", envid="ENV-1", ret="HDRS", body_type="8BITMIME",
        client_ip="2001:db8::7", client_helo="[2001:db8::7]", listener="[::]:587",
    )
    clock.advance(HOUR)

    held = enqueue(store, "dave@example.org", sender="", priority="low", hold=True, body=b"Subject: x\r\n\r\nx\r\n")
    clock.advance(HOUR)
    return Sample(path, clock, store, work, done, deferred, active, queued, held)
