#!/usr/bin/python3
"""Fill a queue database with many messages, fast, for benchmarks of the queue admin side.

fill() writes through the queue's own schema API (schema.migrate, schema.insert_messages) in big
transactions with synchronous=OFF, then sets the recipients' states with plain UPDATEs, so the
result looks like a busy server's queue: most mail queued or deferred (with attempts and errors),
some held, a few being delivered, partly delivered messages, and optionally finished messages
kept for `delivery.retention`.  Domains follow a Zipf-like curve (a few big destinations and a
long tail), as real queues do.  The same seed gives the same queue.

    /usr/bin/python3 bench/queue_fill.py --count 1000000 /var/tmp/q1m/queue.db
    /usr/bin/python3 bench/queue_fill.py --count 100000 --measure /var/tmp/q100k/queue.db

--measure times the elemtactl queries on the filled database (first page of 50, stats, show).
A later bench/queue_cli.py imports fill() from here.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from elemta.queue import db, ids, schema  # after the path set-up above
from elemta.queue.model import NewMessage, NewRecipient

HEADERS = (
    b"Received: from client.example (client.example [192.0.2.7])\r\n\tby mx.example (elemta)"
    b" with ESMTP id %s; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: <%s>\r\nTo: <%s>\r\nSubject: bench message %d\r\nMessage-ID: <%s@bench.example>\r\n\r\n"
)


@dataclass(frozen=True)
class Mix:
    """Shares of recipient states and message priorities (what is left over is 'queued'/'normal')."""

    deferred: float = 0.45
    held: float = 0.05
    active: float = 0.02
    delivered: float = 0.05  # recipients of partly delivered messages
    done: float = 0.0  # whole messages finished (every recipient delivered or failed), body dropped
    critical: float = 0.01
    high: float = 0.04
    low: float = 0.05
    bounces: float = 0.02  # null sender <>


def _domains(count: int) -> tuple[list[str], list[float]]:
    names = [f"dest{k}.example" for k in range(count)]
    weights = [1.0 / (k + 1) ** 1.1 for k in range(count)]
    return names, weights


def fill(
    path: str,
    count: int,
    *,
    now: float | None = None,
    span: float = 2 * 86400.0,
    body_size: int = 1024,
    domains: int = 2000,
    senders: int = 5000,
    mix: Mix = Mix(),  # frozen: one shared default is safe
    batch: int = 20_000,
    seed: int = 1,
    progress=None,
) -> dict:
    """Add `count` messages to the queue database at `path` (created if missing).

    Messages arrive evenly over the `span` seconds before `now`, oldest first, with queue IDs
    made from their arrival times.  Returns counts of what was written.
    """
    rng = random.Random(seed)
    now = time.time() if now is None else now
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = db.connect(path)
    conn.execute("PRAGMA synchronous = OFF")  # a benchmark fixture: speed over durability
    schema.migrate(conn)
    names, weights = _domains(domains)
    sender_pool = [f"user{k}@sender{k % 97}.example" for k in range(senders)]
    padding = b"x" * max(0, body_size - 300)
    states = {"queued": 0, "deferred": 0, "held": 0, "active": 0, "delivered": 0, "failed": 0}
    done_messages = 0
    step = span / max(count, 1)
    written = 0
    while written < count:
        n = min(batch, count - written)
        msgs, plans = [], []
        for i in range(written, written + n):
            created = now - span + i * step
            qid = ids.encode((int(created * 1_000_000) << 10) | (i & 0x3FF))
            rcpts = rng.choices((1, 2, 3, 5), (0.8, 0.12, 0.05, 0.03))[0]
            addresses = tuple(
                f"rcpt{rng.randrange(100_000)}@{d}" for d in rng.choices(names, weights, k=rcpts)
            )
            roll = rng.random()
            priority = ("critical" if roll < mix.critical else "high" if roll < mix.critical + mix.high
                        else "low" if roll < mix.critical + mix.high + mix.low else "normal")
            sender = "" if rng.random() < mix.bounces else rng.choice(sender_pool)
            body = HEADERS % (qid.encode(), sender.encode(), addresses[0].encode(), i, qid.encode()) + padding
            msgs.append(NewMessage(qid, sender, tuple(NewRecipient(a) for a in addresses), body,
                                   priority=priority, client_ip="192.0.2.7", client_helo="client.example",
                                   listener="0.0.0.0:25", received_at=created))
            plans.append((qid, created, rcpts, rng.random() < mix.done))
        with db.write(conn):
            first_id = (conn.execute("SELECT max(id) FROM recipients").fetchone()[0] or 0) + 1
            schema.insert_messages(conn, msgs, now)
            updates, attempts, finished = [], [], []
            rid = first_id
            for qid, created, rcpts, done in plans:
                for _ in range(rcpts):
                    state = "delivered" if done else _state(rng, mix)
                    states[state] += 1
                    updates.append(_recipient_update(rng, rid, state, created, now))
                    attempts.extend(_attempts(rng, rid, qid, state, created, now))
                    rid += 1
                if done:
                    finished.append((created + 60, qid))
            conn.executemany(
                "UPDATE recipients SET state = ?, attempts = ?, next_attempt = ?, last_error = ?,"
                " lease_until = ?, lease_owner = ?, updated = ? WHERE id = ?", updates)
            conn.executemany(
                "INSERT INTO attempts (recipient_id, queue_id, at, host, reply, tls, outcome, ip, port, duration)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", attempts)
            conn.executemany("UPDATE messages SET done_at = ? WHERE queue_id = ?", finished)
            conn.executemany("DELETE FROM bodies WHERE queue_id = ?", [(q,) for _, q in finished])
            done_messages += len(finished)
        written += n
        if progress is not None:
            progress(written)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"messages": count, "done_messages": done_messages, "recipients": states}


def _state(rng: random.Random, mix: Mix) -> str:
    roll = rng.random()
    for state, share in (("deferred", mix.deferred), ("held", mix.held), ("active", mix.active),
                         ("delivered", mix.delivered)):
        if roll < share:
            return state
        roll -= share
    return "queued"


def _recipient_update(rng: random.Random, rid: int, state: str, created: float, now: float) -> tuple:
    attempts, next_attempt, error, lease, owner = 0, created, None, None, None
    if state == "deferred":
        attempts = rng.randint(1, 8)
        next_attempt = now + rng.uniform(0, 3600)
        error = "451 4.7.1 greylisted, try again later"
    elif state == "active":
        attempts, lease, owner = rng.randint(0, 3), now + 300, "bench:1"
    elif state == "delivered":
        attempts = 1
    return (state, attempts, next_attempt, error, lease, owner, now, rid)


def _attempts(rng: random.Random, rid: int, qid: str, state: str, created: float, now: float) -> list:
    if state == "deferred":
        tries = min(3, rng.randint(1, 8))
        return [(rid, qid, min(now, created + 300 * 2 ** k), "mx1.dest.example", "451 4.7.1 greylisted",
                 "TLSv1.3", "deferred", "192.0.2.25", 25, 0.4) for k in range(tries)]
    if state == "delivered":
        return [(rid, qid, created + 5, "mx1.dest.example", "250 2.0.0 ok", "TLSv1.3", "delivered",
                 "192.0.2.25", 25, 0.3)]
    return []


def measure(path: str, repeat: int = 5) -> dict[str, float]:
    """Best-of-`repeat` seconds for the elemtactl queries on a filled database."""
    from elemta.queue.admin import Filters, QueueAdmin

    results = {}
    with QueueAdmin(path) as admin:
        first_page = admin.list(Filters(), limit=50)
        sample = first_page.messages[0].queue_id if first_page.messages else None
        cases = {
            "list 50": lambda: admin.list(Filters(), limit=50),
            "list 50, page 2": lambda: admin.list(Filters(), limit=50, after=first_page.next_after),
            "list 50 --state held": lambda: admin.list(Filters(state="held"), limit=50),
            "list 50 --domain dest7.example": lambda: admin.list(Filters(domain="dest7.example"), limit=50),
            "list 50 --domain dest0.example (biggest)": lambda: admin.list(Filters(domain="dest0.example"), limit=50),
            "list 50 --recipient (no match)": lambda: admin.list(Filters(recipient="nobody@dest0.example"), limit=50),
            "list 50 --older-than 1d": lambda: admin.list(Filters(older_than=86400), limit=50),
            "list 50 --older-than 30d (no match)": lambda: admin.list(Filters(older_than=30 * 86400), limit=50),
            "list 50 --priority critical": lambda: admin.list(Filters(priority="critical"), limit=50),
            "list 50 --sender <> --state held": lambda: admin.list(Filters(sender="<>", state="held"), limit=50),
            "list 50 --sender (no match)": lambda: admin.list(Filters(sender="nobody@nowhere.example"), limit=50),
            "stats": admin.stats,
        }
        if sample:
            cases["show"] = lambda: admin.show(sample)
            cases["trace"] = lambda: admin.trace(sample)
        for name, call in cases.items():
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            results[name] = best
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="queue database to create or add to (e.g. /var/tmp/q/queue.db)")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--done", type=float, default=0.0, help="share of finished messages (default 0)")
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--measure", action="store_true", help="then time list, stats and show")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.count:
        report = fill(args.path, args.count, body_size=args.body_size, seed=args.seed, mix=Mix(done=args.done),
                      progress=lambda n: print(f"\r{n:,} messages", end="", file=sys.stderr, flush=True))
        print(f"\nfilled in {time.monotonic() - start:.1f}s: {report}", file=sys.stderr)
    if args.measure:
        for name, seconds in measure(args.path).items():
            print(f"{name:44} {seconds * 1000:9.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
