"""elemta.delivery.grouping: a delivery's duplicates share the verdict of the recipient they
duplicate, and say so in their attempt records."""

from __future__ import annotations

from elemta.delivery.attempt import AttemptResult, Verdict
from elemta.delivery.grouping import Delivery, everyone, merged
from elemta.delivery.router import Route
from elemta.queue.jobs import Attempt, Job, Outcome, Recipient


def rcpt(rid: int, address: str) -> Recipient:
    return Recipient(rid, address, address.rpartition("@")[2], None, (), 0, False)


def delivery(kept: list[Recipient], duplicates: dict[int, list[Recipient]]) -> Delivery:
    job = Job("0ABCDEFGHJKMN", 0.0, "s@example.com", 10, 1, None, None, "7BIT", False,
              tuple(kept) + tuple(d for ds in duplicates.values() for d in ds))
    return Delivery(job, b"x", Route("lmtp", path="/run/lmtp"), kept, "example.org", duplicates)


def test_everyone_is_the_kept_recipients_and_their_duplicates():
    alice, postmaster, abuse = rcpt(1, "alice@example.org"), rcpt(2, "postmaster@example.org"), rcpt(3, "Alice@example.org")
    dl = delivery([alice], {1: [postmaster, abuse]})
    assert [r.id for r in everyone(dl)] == [1, 2, 3]


def test_a_duplicate_takes_its_recipients_verdict_and_its_attempt_says_so():
    alice, abuse = rcpt(1, "alice@example.org"), rcpt(2, "abuse@example.org")
    dl = delivery([alice], {1: [abuse]})
    outcome = AttemptResult([Verdict(alice, "ok", "250 2.0.0 ok", "2.0.0", host="mx")],
                            [Attempt(1, 5.0, "delivered", "250 2.0.0 ok"), Attempt(1, 7.0, "delivered", "250")])
    result, extra = merged(dl, outcome, [], now=100.0)
    assert [(v.recipient.id, v.status, v.reply) for v in result.verdicts] == [
        (1, "ok", "250 2.0.0 ok"), (2, "ok", "250 2.0.0 ok")]
    dup = result.attempts[-1]
    assert (dup.recipient_id, dup.outcome, dup.at) == (2, "duplicate", 7.0)  # when alice's own ended
    assert "same mailbox as <alice@example.org>" in dup.reply
    assert extra == []


def test_an_extra_outcome_is_copied_to_the_duplicates_too():
    alice, abuse = rcpt(1, "alice@example.org"), rcpt(2, "abuse@example.org")
    dl = delivery([alice], {1: [abuse]})
    held = Outcome(1, "held", "held by a plugin")
    result, extra = merged(dl, AttemptResult(), [held], now=100.0)
    assert [(o.recipient_id, o.state) for o in extra] == [(1, "held"), (2, "held")]
    assert [(a.recipient_id, a.outcome, a.at) for a in result.attempts] == [(2, "duplicate", 100.0)]


def test_without_duplicates_the_outcome_is_the_same_object():
    alice = rcpt(1, "alice@example.org")
    dl = delivery([alice], {})
    outcome = AttemptResult([Verdict(alice, "transient", "451 later", "4.0.0")], [])
    assert merged(dl, outcome, [], now=1.0) == (outcome, [])
