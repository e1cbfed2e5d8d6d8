"""From verdicts to queue changes: delivered, deferred with a retry time, or failed with a DSN.

Delivery status notifications follow RFC 3461: a report goes to the envelope sender when the
recipient's NOTIFY asks for it (no NOTIFY = failures and delays). Mail with the null sender
(a bounce) never gets one: that is logged and, if delivery.double_bounce_to is set, the report
goes there instead. A recipient still failing when its message's lifetime is over fails with
status 4.4.7 and the last error.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elemta import metrics
from elemta.delivery.attempt import Verdict
from elemta.queue import bounce
from elemta.queue.jobs import Attempt, Job, Outcome, Result
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.schedule import RetrySchedule

TRY_NOW = "try now by elemtactl, not counted"


@dataclass(frozen=True)
class Reporting:
    """What report generation needs from the daemon."""

    hostname: str  # Reporting-MTA and the MAILER-DAEMON address
    new_id: Callable[[], str]
    double_bounce_to: str = ""
    log: Callable[..., None] = lambda event, **fields: None


def decide(
    job: Job,
    verdicts: Sequence[Verdict],
    attempts: Sequence[Attempt],
    *,
    schedule: RetrySchedule,
    reporting: Reporting,
    now: float,
    final_hop: bool = False,
    body: bytes = b"",
    rng: random.Random | None = None,
) -> Result:
    """The Result to write for these verdicts; `final_hop` = delivered into a mailbox (LMTP, Maildir)."""
    # The history says which tries were an admin's try now, since they are not in `attempts`.
    uncounted = {v.recipient.id for v in verdicts if not v.recipient.counted}
    result = Result(attempts=[
        dataclasses.replace(a, reply=f"{a.reply} ({TRY_NOW})".lstrip()) if a.recipient_id in uncounted else a
        for a in attempts
    ])
    report: list[bounce.RecipientStatus] = []
    for v in verdicts:
        r = v.recipient
        if v.status == "ok":
            result.outcomes.append(Outcome(r.id, "delivered", v.reply, counted=r.counted))
            action = "delivered" if final_hop else "relayed" if v.relayed else ""
            if action and bounce.wants_report(r.notify, action):
                report.append(_status(v, action, "2.0.0", now))
        elif v.status == "permanent" or schedule.expired(job.created, now):
            expired = v.status != "permanent"
            why = f"delivery time expired (last error: {v.reply})" if expired else v.reply
            result.outcomes.append(Outcome(r.id, "failed", why, counted=r.counted))
            if bounce.wants_report(r.notify, "failed"):
                report.append(_status(v, "failed", "4.4.7" if expired else v.enhanced, now))
        else:
            # An admin's "try now" (release, requeue, flush) that fails again is no step of the
            # schedule: the wait is that of the last counted failure, and the count stays.
            failures = r.attempts + 1 if r.counted else r.attempts
            due = schedule.next_attempt(job.created, failures, now, rng)
            warn = schedule.warn_due(job.created, now, r.warned) and bounce.wants_report(r.notify, "delayed")
            result.outcomes.append(Outcome(r.id, "deferred", v.reply, next_attempt=due, warned=warn,
                                           counted=r.counted))
            if warn:
                status = _status(v, "delayed", v.enhanced, now)
                report.append(dataclasses.replace(status, will_retry_until=schedule.expires_at(job.created)))
    if report:
        message = _report_message(job, report, reporting, now, body)
        if message is not None:
            result.reports.append(message)
    return result


def _status(v: Verdict, action: str, status: str, now: float) -> bounce.RecipientStatus:
    r = v.recipient
    return bounce.RecipientStatus(
        address=r.address, action=action, status=status, orcpt=r.orcpt, remote_mta=v.host,
        diagnostic=v.reply, last_attempt=now,
    )


def _report_message(job: Job, statuses: list[bounce.RecipientStatus], reporting: Reporting, now: float,
                    body: bytes) -> NewMessage | None:
    to = job.sender
    if not to:
        # RFC 5321 §3.6.3: never a report about a report (null sender); that could loop.
        reporting.log("double_bounce", qid=job.queue_id, recipients=len(statuses),
                      to=reporting.double_bounce_to or "-")
        if not reporting.double_bounce_to:
            return None
        to = reporting.double_bounce_to
    queue_id = reporting.new_id()
    original = bounce.OriginalMessage(
        queue_id=job.queue_id, sender=job.sender, arrival=job.created, envid=job.envid, ret=job.ret,
        smtputf8=job.smtputf8, body=body, requiretls=job.requiretls,
    )
    data = bounce.build_report(
        original, statuses, reporting_mta=reporting.hostname, now=now,
        message_id=f"{queue_id}@{reporting.hostname}", postmaster=to if to != job.sender else None,
    )
    actions = {s.action for s in statuses}
    reporting.log("report", qid=job.queue_id, report=queue_id, to=f"<{to}>", actions=",".join(sorted(actions)))
    metrics.REPORTS.labels("bounce" if "failed" in actions else "delay" if "delayed" in actions else "success").inc()
    return NewMessage(
        queue_id=queue_id, sender="", recipients=(NewRecipient(to, notify=("NEVER",)),), body=data,
        priority="high", smtputf8=job.smtputf8, listener="bounce",
    )
