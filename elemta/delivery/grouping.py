"""A claimed message into deliveries: each recipient routed, those that need no connection
settled at once (a failed DNS lookup, a hold, discard or error transport, an alias expanded, a
mailbox the message already reached), the others grouped by route, one delivery per route, and
within it each mailbox once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from elemta import log as logmod
from elemta.delivery.attempt import AttemptResult, Verdict
from elemta.delivery.dns import DnsError
from elemta.delivery.recorder import Recorder
from elemta.delivery.router import Route, Router
from elemta.queue.jobs import Attempt, Job, Outcome, Recipient, Result
from elemta.queue.work import WorkQueue


@dataclass
class Delivery:
    job: Job
    body: bytes
    route: Route
    recipients: list[Recipient]
    domain: str
    # Further recipients of the message for the same mailbox as one in `recipients` (kept id ->
    # them): not sent again, they share its verdict (issue 16, defect 9).
    duplicates: dict[int, list[Recipient]] = field(default_factory=dict)


class Grouping:
    def __init__(self, work: WorkQueue, router: Router, recorder: Recorder, log: logmod.EventLog,
                 clock: Callable[[], float], wake: Callable[[], None]) -> None:
        self.work = work
        self.router = router
        self.recorder = recorder
        self.log = log
        self.clock = clock
        self.wake = wake  # the scheduler's: expanded aliases are due at once

    def split(self, job: Job) -> list[Delivery]:
        """The deliveries job needs; what needs none is recorded here."""
        body = self.work.body(job.queue_id)
        if body is None:  # deleted (elemtactl) after the claim
            return []
        groups: dict[Route, list[Recipient]] = {}
        verdicts: list[Verdict] = []
        expansions: list[tuple[Recipient, tuple[str, ...]]] = []
        result = Result()
        now = self.clock()
        for r in job.recipients:
            try:
                route = self.router.route(r.address, expand=r.parent is None)
            except DnsError as exc:
                verdicts.append(Verdict(r, "permanent" if exc.permanent else "transient", exc.text,
                                        exc.enhanced))
                result.attempts.append(Attempt(r.id, now, "failed" if exc.permanent else "deferred", exc.text))
                continue
            if route.kind == "expand":
                expansions.append((r, route.targets))
            elif route.kind == "hold":
                result.outcomes.append(Outcome(r.id, "held", "held by transport map"))
            elif route.kind == "discard":
                result.outcomes.append(Outcome(r.id, "delivered", "discarded by transport map"))
                result.attempts.append(Attempt(r.id, now, "discarded", "discarded by transport map"))
                self.log("discarded", qid=job.queue_id, rcpt=f"<{r.address}>")
            elif route.kind == "error":
                permanent = route.status.startswith("5")
                verdicts.append(Verdict(r, "permanent" if permanent else "transient", f"{route.status} {route.text}",
                                        route.status))
                result.attempts.append(Attempt(r.id, now, "failed" if permanent else "deferred", route.text))
            else:
                groups.setdefault(route, []).append(r)
        if expansions:
            # The targets and the message's other final recipients are given back to the queue
            # in one transaction, so the next claim takes them together and a mailbox reached
            # twice is sent one copy (_one_copy); delivering the others now would race with
            # the targets' delivery. It costs one claim, and no attempt is counted.
            give_back = [r for rcpts in groups.values() for r in rcpts]
            self.work.expand_all(job.queue_id, expansions, job.priority, give_back)
            groups = {}
            for r, targets in expansions:
                self.log("expanded", qid=job.queue_id, rcpt=f"<{r.address}>", to=",".join(targets))
            self.wake()
        if verdicts or result.outcomes:
            self.recorder.record(job, body, AttemptResult(verdicts, result.attempts), extra=result.outcomes)
        if any(r.parent is not None for rcpts in groups.values() for r in rcpts):
            groups = self._drop_delivered(job, body, groups)
        return [self._one_copy(job, body, route, rcpts) for route, rcpts in groups.items()]

    def _drop_delivered(self, job: Job, body: bytes, groups: dict[Route, list[Recipient]]) -> dict:
        """Alias targets whose mailbox already got this message (another alias, or the address
        itself, was delivered in an earlier round): recorded as delivered, not sent again."""
        key = self.router.recipients.key
        done = {key(address): (rid, address) for rid, address in self.work.delivered_mailboxes(job.queue_id)}
        if not done:
            return groups
        left: dict[Route, list[Recipient]] = {}
        for route, rcpts in groups.items():
            verdicts, attempts = [], []
            for r in rcpts:
                first = done.get(key(r.address))
                if first is None or first[0] == r.id:
                    left.setdefault(route, []).append(r)
                    continue
                reply = f"250 2.0.0 same mailbox as <{first[1]}>, already delivered"
                verdicts.append(Verdict(r, "ok", reply, "2.0.0"))
                attempts.append(Attempt(r.id, self.clock(), "duplicate", reply))
                self.log("duplicate", qid=job.queue_id, rcpt=f"<{r.address}>", same_as=f"<{first[1]}>")
            if verdicts:
                self.recorder.record(job, body, AttemptResult(verdicts, attempts),
                                     final_hop=route.kind in ("lmtp", "maildir"))
        return left

    def _one_copy(self, job: Job, body: bytes, route: Route, rcpts: list[Recipient]) -> Delivery:
        """One delivery for the group, each mailbox once (as Postfix drops duplicate recipients).

        Several aliases of one mailbox (postmaster, abuse -> alice), or one address given twice
        at RCPT in another case (Alice@, alice@), become several final recipients of the message.
        The first is delivered; the others are kept as recipients (so `queue show` and `trace`
        still account for every address the sender used) and take its verdict, each with its
        own NOTIFY and ORCPT, so a DSN reports every original recipient truthfully.
        """
        kept: dict[str, Recipient] = {}
        duplicates: dict[int, list[Recipient]] = {}
        for r in rcpts:
            first = kept.setdefault(self.router.recipients.key(r.address), r)
            if first is not r:
                duplicates.setdefault(first.id, []).append(r)
                self.log("duplicate", qid=job.queue_id, rcpt=f"<{r.address}>", same_as=f"<{first.address}>")
        return Delivery(job, body, route, list(kept.values()), rcpts[0].domain, duplicates)


def everyone(dl: Delivery) -> list[Recipient]:
    """The delivery's recipients and their duplicates."""
    return [*dl.recipients, *(d for dups in dl.duplicates.values() for d in dups)]


def merged(dl: Delivery, outcome: AttemptResult, extra: list[Outcome],
           now: float) -> tuple[AttemptResult, list[Outcome]]:
    """The outcome with each duplicate given the verdict of the recipient it duplicates.

    Its attempt record says so ("duplicate"), so `queue trace` shows it was not sent twice.
    """
    if not dl.duplicates:
        return outcome, extra
    verdicts, attempts, more = list(outcome.verdicts), list(outcome.attempts), list(extra)
    for v in outcome.verdicts:
        for dup in dl.duplicates.get(v.recipient.id, ()):
            verdicts.append(dataclasses.replace(v, recipient=dup))
            attempts.append(Attempt(dup.id, _ended_at(outcome, v.recipient.id, now), "duplicate",
                                    f"same mailbox as <{v.recipient.address}>, sent once: {v.reply}"))
    for o in extra:
        for dup in dl.duplicates.get(o.recipient_id, ()):
            more.append(dataclasses.replace(o, recipient_id=dup.id))
            attempts.append(Attempt(dup.id, _ended_at(outcome, o.recipient_id, now), "duplicate",
                                    f"same mailbox as recipient {o.recipient_id}: {o.error}"))
    return AttemptResult(verdicts, attempts), more


def _ended_at(outcome: AttemptResult, recipient_id: int, now: float) -> float:
    """When the recipient's own attempt ended (its last record), for its duplicates' records."""
    times = [a.at for a in outcome.attempts if a.recipient_id == recipient_id]
    return max(times) if times else now
