#!/usr/bin/python3
"""End-to-end relay throughput: client -> server -> smtp-sink, elemta against Postfix.

Run as root (see bench/README.md):

    /usr/bin/python3 bench/relay.py              # 5 KB, 10 sessions, 5,000 messages, 3 repetitions
    /usr/bin/python3 bench/relay.py --quick      # 1 repetition of 1,000 messages
    /usr/bin/python3 bench/relay.py --latency 200   # also: 250 -> first attempt on an idle queue

smtp-source sends every message on its own connection to the server under test, which relays
everything to one `smtp-sink` on loopback (Postfix through relayhost = [127.0.0.1]:SINK,
elemta through delivery.relayhost). A run is timed from the start of smtp-source until the
sink has counted every message. Both systems run without TLS to the sink and otherwise at
their own defaults (since issue 18 the same concurrency: 20 per destination, Postfix's
default_destination_concurrency_limit, and elemta's SMTP workers "auto"). Reported: median
msgs/s and CPU seconds (user+sys of the server's process tree) per 1,000 messages; the runs
alternate between the systems, the first of each pair rotating.

Latency (--latency N): N messages sent one at a time to an idle elemta; from its queue, the
time from the commit of each message (just before the 250) to the start of its first
delivery attempt, and to the end of that attempt (delivered at the sink).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accept  # the sibling bench module: Postfix setup, smtp-source, CPU counting
from accept import BenchError, log

HELO = "relay.example"


class Sink:
    """Postfix's smtp-sink on loopback, with its running message counter read from stdout."""

    def __init__(self) -> None:
        self.port = accept.free_port()
        self.count = 0
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not accept.wait_banner(self.port, 10):
            raise BenchError("smtp-sink did not start")

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._proc.stdout.read1(4096)
            if not chunk:
                return
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            for line in reversed(done):
                m = re.search(rb"mesg=(\d+)", line)
                if m:
                    self.count = int(m.group(1))
                    break

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait(10)


class RelayPostfix(accept.Postfix):
    def __init__(self, port: int, sink: Sink) -> None:
        super().__init__(port)
        self.sink = sink

    def main_cf(self) -> list[str]:
        settings = [s for s in super().main_cf() if not s.startswith(("relayhost", "defer_transports"))]
        return [*settings, f"relayhost = [127.0.0.1]:{self.sink.port}", "smtp_tls_security_level = none"]

    def queued(self) -> int:
        return sum(self.queue_count(q) for q in ("maildrop", "incoming", "active", "deferred", "hold"))


class RelayElemta(accept.Elemta):
    def __init__(self, sink: Sink, log_level: str = "info", workers: int | str = "auto") -> None:
        super().__init__(log_level=log_level, workers=workers)
        self.sink = sink

    def config_text(self, spool: str) -> str:
        text = super().config_text(spool).replace("[delivery]\nhold = true\n", "")
        return text + f"""
[delivery]
relayhost = "127.0.0.1:{self.sink.port}"
relayhost_tls_policy = "none"
"""


def run_once(server, sink: Sink, count: int, sessions: int, size: int, timeout: float) -> dict:
    server.begin_round()
    try:
        base = sink.count
        cpu0 = server.cpu()
        started = time.monotonic()
        source = accept.smtp_source(server.port, count, size, sessions, False, timeout, helo=HELO)
        deadline = started + timeout
        while sink.count - base < count and time.monotonic() < deadline:
            time.sleep(0.005)  # a benchmark's polling loop, not a test's synchronisation
        elapsed = time.monotonic() - started
        got = sink.count - base
        cpu = server.cpu() - cpu0
        errors = source["stderr"] + ([f"smtp-source exit {source['exit']}"] if source["exit"] else [])
    finally:
        notes = server.end_round()
    return {"system": server.name, "messages": got, "expected": count, "seconds": elapsed,
            "rate": got / elapsed if elapsed else 0.0, "cpu_per_1000": cpu / max(got, 1) * 1000,
            "errors": errors, "notes": notes}


def latency(sink: Sink, count: int) -> dict:
    server = RelayElemta(sink)
    server.start()
    try:
        for i in range(count):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("sender@example.com", [f"rcpt{i}@example.net"], b"Subject: latency\r\n\r\nx\r\n")
        deadline = time.monotonic() + 30
        path = os.path.join(server.spool, "queue.db")
        rows: list = []
        while time.monotonic() < deadline:
            with sqlite3.connect(path, timeout=10) as db:
                rows = db.execute(
                    "SELECT m.created, min(a.at - a.duration), min(a.at) FROM messages m"
                    " JOIN attempts a ON a.queue_id = m.queue_id GROUP BY m.queue_id").fetchall()
            if len(rows) >= count:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    to_start = sorted((start - created) * 1000 for created, start, _ in rows)
    to_done = sorted((done - created) * 1000 for created, _, done in rows)

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    return {"messages": len(rows), "to_attempt_ms": {"median": statistics.median(to_start), "p90": pct(to_start, .9),
                                                      "max": to_start[-1]},
            "to_delivered_ms": {"median": statistics.median(to_done), "p90": pct(to_done, .9), "max": to_done[-1]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency", type=int, default=0, metavar="N")
    parser.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default="auto")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--only", choices=("elemta", "postfix"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.repeat = 1000, 1
    if os.geteuid() != 0:
        raise SystemExit("run as root: Postfix is started and configured for the run")
    accept.Postfix.ensure_installed()
    sink = Sink()
    sink.start()
    postfix = RelayPostfix(accept.free_port(), sink)
    elemta = RelayElemta(sink, log_level=args.log_level, workers=args.workers)
    results: list[dict] = []
    failures = 0
    try:
        systems = [s for s in (elemta, postfix) if args.only in (None, s.name)]
        if postfix in systems:
            postfix.setup()
        timeout = max(120.0, args.count / 20)
        for rep in range(args.repeat):
            order = systems if rep % 2 == 0 else systems[::-1]
            for server in order:
                r = run_once(server, sink, args.count, args.sessions, args.size, timeout)
                results.append(r)
                log(f"{r['system']}: {r['messages']}/{r['expected']} in {r['seconds']:.2f}s = {r['rate']:.0f} msgs/s, "
                    f"{r['cpu_per_1000']:.2f} CPU s/1000" + (f", errors {r['errors'][:3]}" if r["errors"] else ""))
                failures += r["messages"] != r["expected"]
        summary = {}
        for name in ("elemta", "postfix"):
            mine = [r for r in results if r["system"] == name]
            if mine:
                summary[name] = {"rate": statistics.median(r["rate"] for r in mine),
                                 "cpu_per_1000": statistics.median(r["cpu_per_1000"] for r in mine)}
        if len(summary) == 2:
            summary["ratio"] = summary["elemta"]["rate"] / summary["postfix"]["rate"]
        if args.latency:
            if postfix.started:
                postfix.teardown()
            summary["latency"] = latency(sink, args.latency)
    finally:
        postfix.teardown()
        sink.stop()
    machine = accept.machine_info()
    if args.json:
        print(json.dumps({"summary": summary, "runs": results, "machine": machine}, indent=2))
    else:
        # The ratio depends on the CPU: Python's share of the work runs slower, relative to
        # Postfix's, on some (bench/RESULTS.md, sixth session).
        print(f"machine: {machine['cpus']} x {machine['cpu_model'] or '?'}, {machine['python']}, "
              f"elemta {machine['elemta_git']}")
        for name, s in summary.items():
            print(f"{name}: {s}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
