#!/usr/bin/python3
"""elemtactl on a big queue, and intake with a big queue: 100,000 and 1,000,000 messages.

    /usr/bin/python3 bench/queue_cli.py                     # both sizes, CLI timings and intake
    /usr/bin/python3 bench/queue_cli.py --sizes 100000 --no-accept

For each size a queue database is filled once through the queue's schema API (bench/queue_fill.py)
and kept in --dir for the next run. Every recipient still waiting is then made due in two days
(as on a server whose big destinations are down), so the daemon's scheduler has nothing to do
during the intake runs (with mail due it would be delivering, which is another benchmark) and what is measured is intake beside a big queue.

CLI: the real `bin/elemtactl` as a subprocess (Python start-up included, as an admin sees it),
median wall time of --repeat runs: `queue list --limit 50` (plain and --json), `queue stats`,
`queue show ID`, `queue trace ID`, and `--version` for the start-up alone.

Intake: `smtp-source` (Postfix's, 5 KB, 10 sessions, one message per connection) against elemta
with `delivery.hold = true`, alternately on a fresh spool and on the big queue, --accept-repeat
runs each; the median rates and their ratio. The messages a run adds are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import accept  # the sibling bench module: elemta runner, smtp-source
import queue_fill

ELEMTACTL = os.path.join(ROOT, "bin", "elemtactl")
BENCH_LISTENER = "127.0.0.1:%"  # what intake runs add; the fill's messages came in on 0.0.0.0:25


def prepare(directory: str, count: int) -> str:
    """The spool directory of a queue with `count` messages, filled now or by an earlier run."""
    spool = os.path.join(directory, f"q{count}", "spool")
    path = os.path.join(spool, "queue.db")
    marker = os.path.join(spool, f"filled-{count}")
    if not os.path.exists(marker):
        shutil.rmtree(os.path.dirname(spool), ignore_errors=True)
        started = time.monotonic()
        queue_fill.fill(path, count, progress=lambda n: print(f"\rfilling {n:,}/{count:,}", end="",
                                                                 file=sys.stderr, flush=True))
        print(f"\rfilled {count:,} messages in {time.monotonic() - started:.0f}s", file=sys.stderr)
        open(marker, "w").close()
    # Nothing due for two days (again on every run: time has passed since the last one).
    with sqlite3.connect(path, timeout=30) as conn:
        conn.execute("UPDATE recipients SET state = 'deferred', next_attempt = ?, lease_until = NULL,"
                     " lease_owner = NULL WHERE state IN ('queued', 'active', 'deferred')",
                     (time.time() + 2 * 86400,))
    return spool


def config_file(directory: str, spool: str) -> str:
    path = os.path.join(directory, f"elemtactl-{os.path.basename(os.path.dirname(spool))}.toml")
    with open(path, "w") as f:
        # root: keep the cached queue root's rather than give gigabytes to another user
        f.write(f'[server]\nspool_dir = "{spool}"\nuser = "root"\n')
    return path


def time_cli(config: str, args: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run([ELEMTACTL, "--config", config, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=120, check=False)
        runs.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise accept.BenchError(f"elemtactl {' '.join(args)}: exit {done.returncode}: {done.stderr!r}")
    return statistics.median(runs)


def cli_timings(spool: str, directory: str, repeat: int) -> dict[str, float]:
    config = config_file(directory, spool)
    with sqlite3.connect(f"file:{os.path.join(spool, 'queue.db')}?mode=ro", uri=True) as conn:
        sample = conn.execute("SELECT queue_id FROM recipients WHERE state = 'deferred' LIMIT 1").fetchone()[0]
    cases = {
        "--version (start-up only)": ["--version"],
        "queue list --limit 50": ["queue", "list", "--limit", "50"],
        "queue list --limit 50 --json": ["queue", "list", "--limit", "50", "--json"],
        "queue list --limit 50 --domain dest3.example": ["queue", "list", "--limit", "50", "--domain", "dest3.example"],
        "queue stats": ["queue", "stats"],
        "queue show ID": ["queue", "show", sample],
        "queue trace ID": ["queue", "trace", sample],
    }
    return {name: time_cli(config, args, repeat) for name, args in cases.items()}


class SpoolElemta(accept.Elemta):
    """elemta holding new mail, on a given spool (None: a fresh one, as accept.py runs it)."""

    def __init__(self, spool: str | None) -> None:
        super().__init__(log_level="info")
        self.fixed_spool = spool

    def config_text(self, spool: str) -> str:
        return super().config_text(self.fixed_spool or spool)

    def remove_added(self) -> None:
        if self.fixed_spool:
            with sqlite3.connect(os.path.join(self.fixed_spool, "queue.db"), timeout=30) as conn:
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("DELETE FROM messages WHERE listener LIKE ?", (BENCH_LISTENER,))


def intake_run(server: SpoolElemta, count: int, sessions: int, size: int) -> float:
    server.start()
    try:
        accept.smtp_source(server.port, 200, size, sessions, False, 60)  # warm-up
        subprocess.run(["sync"], check=False)
        result = accept.smtp_source(server.port, count, size, sessions, False, 300)
        if result["exit"] or result["timed_out"]:
            raise accept.BenchError(f"smtp-source failed: {result['stderr'][-3:]}")
        return count / result["wall"]
    finally:
        failures = server.stop()
        server.remove_added()
        if failures:
            raise accept.BenchError("; ".join(failures))


def intake(spool: str, repeat: int, count: int) -> dict:
    empty, full = [], []
    for i in range(repeat):
        order = [(None, empty), (spool, full)]
        for where, rates in order if i % 2 == 0 else reversed(order):
            rates.append(intake_run(SpoolElemta(where), count, 10, 5120))
            print(f"  intake {'big queue' if where else 'empty queue'}: {rates[-1]:.0f} msgs/s", file=sys.stderr)
    return {"empty": statistics.median(empty), "big": statistics.median(full),
            "ratio": statistics.median(full) / statistics.median(empty), "runs_empty": empty, "runs_big": full}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="queue sizes, comma-separated")
    parser.add_argument("--dir", default="/var/tmp/elemta-bench-queue", help="where the filled queues are kept")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each elemtactl command")
    parser.add_argument("--accept-repeat", type=int, default=3, help="intake runs on each queue")
    parser.add_argument("--accept-count", type=int, default=5000)
    parser.add_argument("--no-accept", action="store_true", help="CLI timings only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.no_accept and shutil.which("smtp-source") is None:
        print("queue_cli.py: smtp-source not found (apt-get install postfix), or use --no-accept", file=sys.stderr)
        return 69
    report = {}
    for count in [int(n) for n in args.sizes.split(",")]:
        spool = prepare(args.dir, count)
        cell = {"cli_seconds": cli_timings(spool, args.dir, args.repeat)}
        if not args.no_accept:
            cell["intake"] = intake(spool, args.accept_repeat, args.accept_count)
        report[count] = cell
        print(f"{count:,} messages queued", file=sys.stderr)
        for name, seconds in cell["cli_seconds"].items():
            print(f"  {name:46} {seconds * 1000:8.0f} ms", file=sys.stderr)
        if "intake" in cell:
            i = cell["intake"]
            print(f"  intake: empty {i['empty']:.0f} msgs/s, with the queue {i['big']:.0f} msgs/s,"
                  f" ratio {i['ratio']:.2f}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
