"""Durability of delivery (issue 16): the whole process tree is killed with SIGKILL while it
delivers to a loopback MX that records every message, several rounds, then started once more.
Every message whose 250 the client saw must arrive; a message the MX took whose record the
killed process had not written yet arrives twice, and those duplicates are counted and printed
(run with -s to see them; ELEMTA_KILL_SUMMARY=FILE appends them to FILE as one JSON line).
The moments of the kills are random (ELEMTA_KILL_SEED=N repeats a run); the seed is printed.
Each kill comes just as the MX counts a message, so inside the window between a remote's 250
and elemta's record of it for the deliveries finishing then: the counts are near the worst
case, up to about one round of delivery.concurrency (10) per kill.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import smtplib
import subprocess

from tests.mx import Mx
from tests.support import Daemon, wait_for

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
max_connections_per_ip = 100

[smtp]
local_domains = ["example.com"]
relay_domains = ["elsewhere.example"]

[queue]
min_free_space = 0

[delivery]
relayhost = "127.0.0.1:@MX@"
relayhost_tls_policy = "none"
concurrency = 10
destination_concurrency = 10
"""

MESSAGES = 300
ROUNDS = 5


def tree(pid: int) -> list[int]:
    """pid and its descendants."""
    found = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            children = [int(c) for c in handle.read().split()]
    except OSError:
        return found
    for child in children:
        found += tree(child)
    return found


def kill_tree(daemon: Daemon) -> None:
    """SIGKILL for every process at once (the supervisor stopped first, so it neither restarts
    a child nor, dying, sends them the SIGTERM that would stop them cleanly)."""
    root = daemon.proc.pid
    os.kill(root, signal.SIGSTOP)
    for pid in reversed(tree(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    daemon.proc.wait(10)
    daemon._reap()


def test_kill_9_during_delivery_loses_nothing_and_duplicates_are_few(tmp_path, record_property):
    seed = int(os.environ.get("ELEMTA_KILL_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    sent: dict[str, int] = {}  # Message-ID -> round acknowledged
    with Mx() as mx:
        mx.handler.data_delay = 0.1  # a remote that takes a moment: deliveries are in flight
        daemon = Daemon(tmp_path, CONFIG.replace("@MX@", str(mx.port)))
        per_round = MESSAGES // ROUNDS
        try:
            for round_ in range(ROUNDS):
                daemon.start()
                before = len(mx.handler.received())
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                    for n in range(per_round):
                        mid = f"<r{round_}n{n}@client.example>"
                        client.sendmail("a@example.org", ["b@elsewhere.example"],
                                        f"Message-ID: {mid}\r\nSubject: {n}\r\n\r\nround {round_}\r\n")
                        sent[mid] = round_
                # Kill while delivering: after some, not all, of this round's mail has arrived.
                target = before + rng.randrange(per_round // 2, per_round - 5)
                wait_for(lambda target=target: len(mx.handler.received()) >= target, 30,
                         what=f"deliveries under way; log: {daemon.log_text()[-600:]}")
                kill_tree(daemon)
            daemon.start()
            wait_for(lambda: _arrived(mx) >= set(sent), 60, what="every acknowledged message delivered")
            wait_for(lambda: _queue_empty(daemon), 30, what="the queue to finish")
            with daemon.db() as conn:
                assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                try:
                    daemon.stop(20)
                except subprocess.TimeoutExpired:
                    kill_tree(daemon)
        received = [_message_id(m.data) for m in mx.handler.received()]
    missing = set(sent) - set(received)
    duplicates = len(received) - len(set(received))
    copies = collections.Counter(received)
    by_round = [sum(n - 1 for mid, n in copies.items() if sent.get(mid) == r) for r in range(ROUNDS)]
    summary = {"seed": seed, "rounds": ROUNDS, "acknowledged": len(sent), "received": len(received),
               "duplicates": duplicates, "duplicates_by_round": by_round, "missing": len(missing)}
    print(f"\ndelivery kill -9: {ROUNDS} rounds (seed {seed}), {len(sent)} messages acknowledged, "
          f"{len(received)} received, {duplicates} duplicates (by round {by_round}), {len(missing)} missing")
    record_property("delivery_kill", json.dumps(summary))
    if os.environ.get("ELEMTA_KILL_SUMMARY"):
        with open(os.environ["ELEMTA_KILL_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")
    assert not missing
    assert set(received) <= set(sent)
    # Each kill can catch the deliveries in flight (delivery.concurrency, 10: the MX took the
    # message, its 250 or the record of it was not written yet) and those whose record waited
    # for the results writer's next commit; far beyond that would be a bug.
    assert duplicates <= ROUNDS * 30


def _message_id(content: bytes) -> str:
    match = re.search(rb"^Message-ID: (<[^>]+>)", content, re.MULTILINE | re.IGNORECASE)
    return match.group(1).decode() if match else "?"


def _arrived(mx: Mx) -> set[str]:
    return {_message_id(m.data) for m in mx.handler.received()}


def _queue_empty(daemon: Daemon) -> bool:
    with daemon.db() as conn:
        return conn.execute("SELECT count(*) FROM recipients WHERE state NOT IN ('delivered', 'failed')"
                            ).fetchone()[0] == 0
