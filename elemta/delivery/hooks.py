"""Delivery's side of the plugins: on_pre_delivery before an attempt, and the success and
failure notices after it.  The scheduler records what a verdict means; plugins never write
the queue themselves."""

from __future__ import annotations

from elemta.delivery.attempt import AttemptResult, Verdict
from elemta.plugins import api
from elemta.queue.jobs import Attempt, Outcome


def _context(hook: str, dl, **fields) -> api.Context:
    route = dl.route
    hop = route.path or ",".join(route.hosts)
    return api.Context(hook, delivery=api.Delivery(
        queue_id=dl.job.queue_id, sender=dl.job.sender, recipients=tuple(r.address for r in dl.recipients),
        attempt=max((r.attempts for r in dl.recipients), default=0) + 1, next_hop=f"{route.kind}:{hop}", **fields,
    ))


def pre_delivery(plugins, dl, now: float) -> tuple[AttemptResult, list[Outcome], str] | None:
    """None to go on with the attempt; else what to record instead, and the verdict's name.

    reject bounces the recipients (permanent), defer retries them on the usual schedule,
    discard drops them as delivered, quarantine holds them (elemtactl queue release).
    """
    if plugins is None or not plugins.wants("on_pre_delivery"):
        return None
    out = plugins.run("on_pre_delivery", _context("on_pre_delivery", dl))
    v, who = out.verdict, f"plugin {out.plugin}"
    if v.reply is not None:
        status, state = ("permanent", "failed") if v.reply.is_permanent else ("transient", "deferred")
        reply = str(v.reply)
        return (AttemptResult([Verdict(r, status, reply, v.reply.enhanced) for r in dl.recipients],
                        [Attempt(r.id, now, state, reply, host=who) for r in dl.recipients]), [], v.action)
    if v.action == "discard":
        text = f"discarded by {who}"
        return (AttemptResult([], [Attempt(r.id, now, "discarded", text, host=who) for r in dl.recipients]),
                [Outcome(r.id, "delivered", text) for r in dl.recipients], v.action)
    if v.action == "quarantine":
        text = f"held by {who}: {v.reason or 'quarantine'}"
        return AttemptResult(), [Outcome(r.id, "held", text) for r in dl.recipients], v.action
    return None


def notices(plugins, dl, outcome: AttemptResult) -> None:
    """on_delivery_success for the recipients that arrived, on_delivery_failure for the rest."""
    if plugins is None:
        return
    done = [v for v in outcome.verdicts if v.status == "ok"]
    failed = [v for v in outcome.verdicts if v.status != "ok"]
    for hook, verdicts in (("on_delivery_success", done), ("on_delivery_failure", failed)):
        if verdicts and plugins.wants(hook):
            ctx = _context(hook, dl, reply=verdicts[0].reply[:500],
                           permanent=any(v.status == "permanent" for v in verdicts))
            assert ctx.delivery is not None  # _context() always gives one
            ctx.delivery.recipients = tuple(v.recipient.address for v in verdicts)
            plugins.run(hook, ctx)
