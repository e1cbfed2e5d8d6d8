"""What a delivery's verdicts become in the queue: outcomes.decide() turns them into delivered,
deferred or failed (and the reports to send), the queue's results writer takes them, and each
recipient's outcome is logged and counted.  An error of elemta's own gives the recipients back
due again soon instead."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from elemta import log as logmod
from elemta import metrics
from elemta.delivery.attempt import AttemptResult, Verdict
from elemta.delivery.outcomes import Reporting, decide
from elemta.delivery.router import Route
from elemta.queue.jobs import Attempt, Job, Outcome, Recipient, Result
from elemta.queue.results import ERROR_RETRY
from elemta.queue.schedule import RetrySchedule
from elemta.queue.work import WorkQueue

INTERNAL_ERROR = "451 4.3.0 delivery ended in an internal error; tried again later"


class Recorder:
    def __init__(self, work: WorkQueue, schedule: RetrySchedule, reporting: Reporting, log: logmod.EventLog,
                 clock: Callable[[], float], rng: random.Random, wake: Callable[[], None]) -> None:
        self.work = work
        self.schedule = schedule
        self.reporting = reporting
        self.log = log
        self.clock = clock
        self.rng = rng
        self.wake = wake  # the scheduler's: a report (DSN) it queued is new mail

    def record(self, job: Job, body: bytes, outcome: AttemptResult, *, final_hop: bool = False,
               extra: Sequence[Outcome] = (), route: Route | None = None) -> None:
        """The verdicts of one delivery (and `extra` outcomes decided without one) to the queue."""
        now = self.clock()
        try:
            result = decide(job, outcome.verdicts, outcome.attempts, schedule=self.schedule,
                            reporting=self.reporting, now=now, final_hop=final_hop, body=body, rng=self.rng)
        except Exception:
            # The remote has answered: what it took is recorded as delivered whatever else fails.
            self.after_error(job, [v.recipient for v in outcome.verdicts if v.status != "ok"],
                             delivered=[v for v in outcome.verdicts if v.status == "ok"])
            raise
        result.outcomes.extend(extra)
        self.work.submit(job.queue_id, result, self.wake if result.reports else None)
        destination = metrics.destination(route.describe() if route is not None else "none")
        for v, o in zip(outcome.verdicts, result.outcomes, strict=False):
            self.log(o.state, qid=job.queue_id, rcpt=f"<{v.recipient.address}>", relay=v.host or "-",
                     reply=v.reply[:200], level=logmod.INFO if o.state != "failed" else logmod.WARNING)
            metrics.DELIVERY_ATTEMPTS.labels(o.state, destination).inc()
            if o.state == "delivered":
                metrics.DELIVERY_DELAY.observe(max(0.0, now - job.created))
        addresses = {r.id: r.address for r in job.recipients}
        for o in extra:
            if o.state == "held":
                self.log("held", qid=job.queue_id, rcpt=f"<{addresses.get(o.recipient_id, '?')}>", reply=o.error)

    def after_error(self, job: Job, recipients: Sequence[Recipient], delivered: Sequence[Verdict] = ()) -> None:
        """A delivery ended in an error of elemta's own (a bug, a database error while routing):
        its recipients are due again in ERROR_RETRY seconds (no attempt counted), not
        when their hour-long lease runs out; those in `delivered` (the remote took them) are
        recorded as delivered. Written like any result: kept and retried if the write fails."""
        now = self.clock()
        result = Result()
        for v in delivered:
            result.outcomes.append(Outcome(v.recipient.id, "delivered", v.reply, counted=v.recipient.counted))
            result.attempts.append(Attempt(v.recipient.id, now, "delivered", v.reply, host=v.host))
        for r in recipients:
            result.outcomes.append(Outcome(r.id, "deferred", INTERNAL_ERROR, next_attempt=now + ERROR_RETRY,
                                           counted=False))
            result.attempts.append(Attempt(r.id, now, "deferred", INTERNAL_ERROR))
        self.work.submit(job.queue_id, result, self.wake)
