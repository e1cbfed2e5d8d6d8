#!/usr/bin/python3
"""Large messages: what accepting 5 KB, 100 KB and 1 MB costs elemta, against Postfix.

Run as root (see bench/README.md):

    /usr/bin/python3 bench/accept_large.py                        # 5 runs per system and size
    /usr/bin/python3 bench/accept_large.py --quick                # 1 run, small counts
    /usr/bin/python3 bench/accept_large.py --baseline /tmp/old    # also elemta from another tree

smtp-source, 10 sessions, one message per connection, into Postfix's hold queue and into
elemta's queue (held) with `server.workers = 1` and `= 2` (and, with `--baseline DIR`, the
same two for the elemta checked out in DIR, e.g. a `git worktree` of an older commit).  Per
size every system takes the same load `--repeat` times, in an order that rotates from one
repetition to the next; reported are the medians of msgs/s and of the CPU (user + sys of the
whole process tree: elemta's supervisor, workers, delivery and monitor processes; Postfix's
master and everything under it) per message, both as ratios to Postfix, and the cost of one
more KB: the growth of the median CPU per message from one size to the next, divided by the
KB in between.  It reuses accept.py's Postfix setup, smtp-source runner and CPU counting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accept  # noqa: E402 -- the bench's shared parts
from accept import BenchError, log  # noqa: E402

SIZES = (5120, 102400, 1048576)
COUNTS = {5120: 3000, 102400: 1500, 1048576: 300}  # about 2-4 s per run here
QUICK_COUNTS = {5120: 300, 102400: 100, 1048576: 30}


class System:
    """One column of the table: Postfix, or an elemta binary with a number of workers."""

    def __init__(self, label: str, server):
        self.label = label
        self.server = server


def systems_for(args, postfix) -> list[System]:
    out = [System("postfix", postfix)] if postfix is not None else []
    trees = [("elemta", accept.ELEMTA)]
    if args.baseline:
        trees.insert(0, ("base", os.path.join(os.path.abspath(args.baseline), "bin", "elemta")))
    for name, binary in trees:
        for workers in args.workers:
            out.append(System(f"{name} w{workers}", accept.Elemta(
                log_level=args.log_level, workers=workers, binary=binary)))
    return out


def run_cell(systems: list[System], size: int, count: int, args, index: int, cpus: int,
             failures: list[str]) -> dict:
    cell = {"size": size, "count": count, "runs": {s.label: [] for s in systems}}
    timeout = 60 + count * max(1, size // 102400) / 10
    for rep in range(args.repeat):
        shift = (rep + index) % len(systems)
        order = systems[shift:] + systems[:shift]
        for system in order:
            if system.label == "postfix" and not system.server.alive():
                # accept.py and relay.py restore Postfix's config (and stop it) when they find
                # a saved copy: another bench started on this machine.  Nothing to compare then.
                raise BenchError("Postfix is no longer running: was another bench started? (see its log)")
            for attempt in range(args.retries + 1):
                m = accept.measure_safely(system.server, system.server if system.label != "postfix" else None,
                                          size, args.sessions, False, count, timeout)
                busy = m["other_cpu_s"] / (m["wall_s"] * cpus) if m["wall_s"] else 0.0
                m["other_share"], m["attempt"] = busy, attempt + 1
                log(f"{accept.fmt_size(size):>7} rep {rep + 1}/{args.repeat} {system.label:9s}"
                    f" {m['msgs_per_s']:8.1f} msgs/s  cpu {m['cpu_s_per_1000']:6.2f} ms/msg"
                    f"  wall {m['wall_s']:5.2f} s  other {busy:4.0%}  stored {m['stored']}/{count}")
                for p in m["problems"]:
                    log(f"    {system.label}: {p}")
                if m["problems"] or busy <= args.max_other or attempt == args.retries:
                    break
                log(f"    {busy:.0%} of the CPUs went to something else: again")
            failures += [f"{accept.fmt_size(size)} {system.label}: {p}" for p in m["problems"]]
            cell["runs"][system.label].append(m)
    cell["median"] = {
        label: {"msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs),
                "cpu_ms": statistics.median(r["cpu_s_per_1000"] for r in runs)}
        for label, runs in cell["runs"].items()
    }
    return cell


def format_table(cells: list[dict], labels: list[str]) -> str:
    head = f"{'size':>7} {'system':9} | {'msgs/s':>8} {'x pf':>5} | {'CPU ms/msg':>10} {'x pf':>5} | runs msgs/s"
    lines = ["Accepting, 10 sessions, one message per connection: medians; x pf = ratio to Postfix",
             head, "-" * len(head)]

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:5.2f}" if b else "    -"

    for cell in cells:
        pf = cell["median"].get("postfix", {})
        for label in labels:
            med = cell["median"][label]
            runs = " ".join(f"{r['msgs_per_s']:.0f}" for r in cell["runs"][label])
            lines.append(
                f"{accept.fmt_size(cell['size']):>7} {label:9} | {med['msgs_per_s']:8.1f}"
                f" {ratio(med['msgs_per_s'], pf.get('msgs_per_s'))} | {med['cpu_ms']:10.3f}"
                f" {ratio(med['cpu_ms'], pf.get('cpu_ms'))} | {runs}")
    lines.append("")
    lines.append("CPU per extra KB (growth of the median CPU per message / KB between sizes), us/KB")
    for label in labels:
        parts = []
        for a, b in zip(cells, cells[1:], strict=False):
            kb = (b["size"] - a["size"]) / 1024
            slope = (b["median"][label]["cpu_ms"] - a["median"][label]["cpu_ms"]) * 1000 / kb
            parts.append(f"{accept.fmt_size(a['size'])}->{accept.fmt_size(b['size'])} {slope:6.2f}")
        lines.append(f"  {label:9} " + "   ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, one repetition")
    p.add_argument("--repeat", type=int, default=5, metavar="R", help="runs per system and size (default 5)")
    p.add_argument("--sizes", type=accept.int_list, default=SIZES, metavar="B,B",
                   help="message sizes in bytes (default 5120,102400,1048576)")
    p.add_argument("--count", type=accept.int_list, metavar="N,N", help="messages per run, one per size")
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--workers", type=accept.int_list, default=(1, 2), metavar="N,N",
                   help="elemta's server.workers, one system each (default 1,2)")
    p.add_argument("--baseline", metavar="DIR", help="also measure bin/elemta of this tree (same workers)")
    p.add_argument("--no-postfix", action="store_true", help="elemta only (no root needed for Postfix)")
    p.add_argument("--log-level", choices=("info", "warning"), default="info")
    p.add_argument("--max-other", type=float, default=0.25, metavar="F")
    p.add_argument("--retries", type=int, default=2, metavar="N")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if os.geteuid() != 0 and not args.no_postfix:
        p.error("run as root: Postfix is configured, started and stopped")
    if args.quick:
        args.repeat = 1
    counts = dict(zip(args.sizes, args.count, strict=True)) if args.count else {
        s: (QUICK_COUNTS if args.quick else COUNTS).get(s, max(30, 100_000_000 // s)) for s in args.sizes}

    def on_term(signum, frame):
        raise KeyboardInterrupt

    import signal
    signal.signal(signal.SIGTERM, on_term)
    postfix = None if args.no_postfix else accept.Postfix(accept.free_port())
    systems = systems_for(args, postfix)
    labels = [s.label for s in systems]
    cells, failures = [], []
    cpus = os.cpu_count() or 1
    started = time.time()
    try:
        if postfix is not None:
            postfix.setup()
        log(f"postfix {postfix.version if postfix else '-'}; systems {', '.join(labels)}; sizes {args.sizes}; counts {counts}")
        for index, size in enumerate(args.sizes):
            cells.append(run_cell(systems, size, counts[size], args, index, cpus, failures))
    except BenchError as exc:
        failures.append(f"aborted: {exc}")
        log(f"ABORTED: {exc}")
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        for s in systems:
            if s.label != "postfix" and s.server.proc is not None:
                s.server.stop()
        if postfix is not None:
            postfix.teardown()
    table = format_table(cells, labels) if cells else ""
    print(table)
    for f in failures:
        print(f"  problem: {f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "accept-large", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                       time.localtime(started)), "seconds": round(time.time() - started, 1),
                       "machine": accept.machine_info(), "postfix_version": postfix.version if postfix else None,
                       "baseline": args.baseline, "sessions": args.sessions, "cells": cells,
                       "problems": failures, "table": table}, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
