"""What a claim hands to a delivery and what the delivery hands back (queue/work.py).

Plain values, so the delivery side (delivery/) can make and read them without the queue's
database code: a Job is one message with the recipients claimed together, a Result is
everything one delivery decided about them, written in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elemta.queue.model import NewMessage


@dataclass(frozen=True)
class Recipient:
    id: int
    address: str
    domain: str
    orcpt: str | None
    notify: tuple[str, ...]
    attempts: int
    warned: bool
    parent: int | None = None  # the alias row this one was expanded from
    # False for an admin's "try now": a recipient tried before and made due again by
    # elemtactl release/requeue/flush (it waits as 'queued', not 'deferred'). Such a try is
    # recorded in the history but is no failed attempt of the retry schedule: counting it
    # pushed the next retry out (three commands in a second made attempt 1 into attempt 4).
    counted: bool = True


@dataclass(frozen=True)
class Job:
    """One message and those of its recipients that were claimed together."""

    queue_id: str
    created: float
    sender: str
    size: int
    priority: int
    envid: str | None
    ret: str | None
    body_type: str
    smtputf8: bool
    recipients: tuple[Recipient, ...]
    requiretls: bool = False  # RFC 8689 (delivery/attempt.py)


@dataclass(frozen=True)
class Attempt:
    """One try of one recipient at one host, for the history (`elemtactl queue trace`)."""

    recipient_id: int
    at: float
    outcome: str  # delivered | deferred | failed | expanded | discarded | ...
    reply: str = ""
    host: str = ""
    ip: str = ""
    port: int = 0
    tls: str = ""
    duration: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """Where one claimed recipient goes next."""

    recipient_id: int
    state: str  # delivered | deferred | failed | held
    error: str = ""  # becomes last_error
    next_attempt: float | None = None  # deferred: when it is due again
    warned: bool = False  # a delay warning was sent (never send two)
    counted: bool = True  # adds one to the recipient's attempts (see Recipient.counted)


@dataclass
class Result:
    """Everything one delivery decided, written in one transaction."""

    outcomes: list[Outcome] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    reports: list[NewMessage] = field(default_factory=list)  # bounces / DSNs to enqueue
    # Claimed recipients given back untried (release()): written by the same writer, in order,
    # and retried like the rest when the write fails, so they do not wait for a lease to end.
    release: list[Recipient | int] = field(default_factory=list)

    def recipient_ids(self) -> set[int]:
        return {o.recipient_id for o in self.outcomes} | {
            r.id if isinstance(r, Recipient) else r for r in self.release}
