#!/usr/bin/python3
"""Local submission: /usr/sbin/sendmail as cron and web applications run it, elemta against Postfix.

Run as root (see bench/README.md):

    /usr/bin/python3 bench/sendmail.py            # 300 messages, 4 submitters, 3 runs each
    /usr/bin/python3 bench/sendmail.py --quick    # 1 run of 100

Each submitter is an ordinary user (UID 1) running `sendmail -t -i` once per message, one
after another, as a web application's PHP mail() calls would; several submitters run side by
side.  A run is timed from the first call until the server has every message in its queue
(elemta: taken from its maildrop into queue.db, held; Postfix: postdrop -> pickup -> cleanup
into its hold queue, by a header_checks HOLD on the bench's Subject).  Reported: median
messages per second, the median time one sendmail call takes (what the caller waits), and
CPU milliseconds per message, split into the sendmail processes' own (user+sys of the
children) and the server's process tree.  The systems alternate, the first of each pair
rotating.  elemta's sendmail is bin/elemta-sendmail (a shell launcher, as in a checkout).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accept  # the sibling bench module: Postfix setup, CPU counting
from accept import BenchError, log

SUBMITTER = 1  # Debian's "daemon": neither root nor the service's user
SUBJECT = "sendmail-bench"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = (f"From: app@example.com\nTo: rcpt@example.net\nSubject: {SUBJECT}\n\n"
           + "A line of a report that cron or a web application sends.\n" * 60).encode()


class HoldingPostfix(accept.Postfix):
    """accept.py's Postfix, holding locally submitted mail with the bench's Subject."""

    def main_cf(self) -> list[str]:
        return super().main_cf() + [f"header_checks = regexp:{{ {{/^Subject: {SUBJECT}/ HOLD}} }}"]

    def sendmail(self) -> list[str]:
        return ["/usr/sbin/sendmail", "-t", "-i"]


class ElemtaServer(accept.Elemta):
    def sendmail(self) -> list[str]:
        return [os.path.join(ROOT, "bin", "elemta-sendmail"), "-C", os.path.join(self.workdir, "elemta.toml"),
                "-t", "-i"]

    def start(self) -> None:
        super().start()
        os.chmod(os.path.join(self.workdir, "elemta.toml"), 0o644)  # read by the submitter


def as_submitter() -> None:
    os.setgroups([])
    os.setgid(SUBMITTER)
    os.setuid(SUBMITTER)


def run_once(server, count: int, submitters: int, timeout: float) -> dict:
    command = server.sendmail()
    calls: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        for _ in range(n):
            t0 = time.monotonic()
            proc = subprocess.run(command, input=MESSAGE, capture_output=True, preexec_fn=as_submitter,
                                  cwd="/", timeout=60, check=False)
            with lock:
                calls.append(time.monotonic() - t0)
                if proc.returncode != 0:
                    failures.append(f"exit {proc.returncode}: {proc.stderr[:200]!r}")

    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = server.cpu()
    started = time.monotonic()
    threads = [threading.Thread(target=submit, args=(count // submitters + (i < count % submitters),))
               for i in range(submitters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = started + timeout
    while server.stored() < count:
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name}: {server.stored()}/{count} stored after {timeout:.0f} s")
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (children_after.ru_utime - children_before.ru_utime) + (children_after.ru_stime - children_before.ru_stime)
    server_cpu = server.cpu() - cpu_before
    if failures:
        raise BenchError(f"{server.name}: {len(failures)} sendmail calls failed, first: {failures[0]}")
    return {
        "rate": count / elapsed,
        "call_ms": statistics.median(calls) * 1000,
        "client_cpu_ms": client_cpu * 1000 / count,
        "server_cpu_ms": server_cpu * 1000 / count,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--submitters", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run of 100 each")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (Postfix is configured and started; submitters become UID 1)")
    count, repeat = (100, 1) if args.quick else (args.count, args.repeat)
    postfix = HoldingPostfix(accept.free_port())
    elemta = ElemtaServer()
    results: dict[str, list[dict]] = {"elemta": [], "postfix": []}
    try:
        postfix.setup()
        for rep in range(repeat):
            order = (elemta, postfix) if rep % 2 == 0 else (postfix, elemta)
            for server in order:
                if server is elemta:
                    elemta.start()
                try:
                    result = run_once(server, count, args.submitters, 60 + count / 5)
                finally:
                    if server is elemta:
                        elemta.stop()
                    else:
                        postfix.end_round()
                results[server.name].append(result)
                log(f"{server.name}: {count} in {count / result['rate']:.2f}s = {result['rate']:.0f} msgs/s, "
                    f"call {result['call_ms']:.1f} ms, CPU {result['client_cpu_ms']:.1f} ms (sendmail) + "
                    f"{result['server_cpu_ms']:.1f} ms (server) per message")
    finally:
        elemta.stop()
        postfix.teardown()
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items() if runs}
    for name, m in medians.items():
        log(f"median {name}: {m['rate']:.0f} msgs/s, call {m['call_ms']:.1f} ms, CPU per message "
            f"{m['client_cpu_ms']:.1f} ms sendmail + {m['server_cpu_ms']:.1f} ms server")
    if len(medians) == 2:
        log(f"elemta/Postfix: rate {medians['elemta']['rate'] / medians['postfix']['rate']:.2f}x, "
            f"total CPU per message {(medians['elemta']['client_cpu_ms'] + medians['elemta']['server_cpu_ms']) / (medians['postfix']['client_cpu_ms'] + medians['postfix']['server_cpu_ms']):.2f}x")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(1)
