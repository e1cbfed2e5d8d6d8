#!/usr/bin/python3
"""Instructions per message, counted by valgrind's callgrind: a measure that other work on
the machine does not move, for changes too small to see in a wall-clock benchmark.

    /usr/bin/python3 bench/instructions.py                        # intake and delivery, 5 KB
    /usr/bin/python3 bench/instructions.py --parts intake --store none --log-level warning
    /usr/bin/python3 bench/instructions.py --tree /tmp/elemta-old # another checkout (a git worktree)

`intake`: an SmtpServer (the listener's loop, the sessions, the queue writer) in this process,
with smtp-source (from the postfix package, not counted) sending one message per connection
over --sessions sessions.  `--store none` answers every message as stored at once, without
SQLite, to count the loop and the sessions alone.  `delivery`: a queue filled beforehand by a
process that is not counted, then the delivery scheduler relaying every message through
`delivery.relayhost` to smtp-sink (not counted).  Each part runs twice, with --count and
twice --count messages; the difference divided by --count is the cost of one message, without
the start and the end.  Only instructions in user space are counted (not the kernel's), and
valgrind runs the threads one at a time, so batches may differ from a real run's: the figure
is for comparing two versions, not a CPU time.  No root; 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = (b"From: <sender@example.com>\r\nTo: <rcpt@example.net>\r\nSubject: bench\r\n\r\n"
        + b"0123456789" * 7 + b"\r\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # a benchmark's wait for a peer to listen, bounded


def config(tree: str, spool: str, log_level: str, relayhost: str = ""):
    sys.path.insert(0, tree)
    from elemta import config as cfg
    delivery = {"hold": True}
    if relayhost:
        delivery = {"relayhost": relayhost, "relayhost_tls_policy": "none", "mta_sts": False,
                    "tls_reports": False}
    return cfg.parse({
        "listeners": [{"address": "127.0.0.1:0", "role": "mx"}],
        "server": {"spool_dir": spool, "hostname": "bench.localdomain",
                   "max_connections": 10000, "max_connections_per_ip": 10000},
        "smtp": {"relay_domains": ["example.net"]},
        "queue": {"min_free_space": 0},
        "delivery": delivery,
        "log": {"level": log_level},
    })


def run_intake(args) -> None:
    """In the process valgrind counts: a server, smtp-source sending to it."""
    spool = tempfile.mkdtemp(prefix="elemta-instr-", dir=args.dir)
    try:
        conf = config(args.tree, spool, args.log_level)
        from elemta.log import EventLog
        from elemta.queue import store as storemod
        from elemta.smtp.server import SmtpServer
        store = storemod.Store(conf.queue_path)
        store.open()
        if args.store == "none":
            def stored_at_once(msg, callback):
                request = storemod._Request(msg, callback)
                request.take()
                request.finish(None)
                return request
            store.submit = stored_at_once
        server = SmtpServer(conf, store, EventLog(conf.log.level, sink=lambda line: None))
        server.start()
        port = next(iter(server.listeners.values())).port
        subprocess.run(["smtp-source", "-4", *(["-d"] if args.reuse else []), "-s", str(args.sessions), "-m", str(args.n), "-l", str(args.size),
                        "-M", "client.example", "-f", "sender@example.com", "-t", "rcpt@example.net",
                        f"127.0.0.1:{port}"], check=True, timeout=600)
        server.stop(grace=5)
        store.close()
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def fill(args) -> None:
    """Not counted: the queue the delivery part empties."""
    sys.path.insert(0, args.tree)
    from elemta.queue.model import NewMessage, NewRecipient
    from elemta.queue.store import Store
    store = Store(os.path.join(args.spool, "queue.db"))
    store.open()
    text = b"Received: from client.example\r\n" + BODY
    text += (b"X" * 76 + b"\r\n") * max(0, (args.size - len(text)) // 78)
    for _ in range(args.n):
        store.enqueue(NewMessage(store.new_id(), "sender@example.com", (NewRecipient("rcpt@example.net"),), text))
    store.close()


def run_delivery(args) -> None:
    """In the process valgrind counts: the scheduler relaying a filled queue to smtp-sink."""
    spool = tempfile.mkdtemp(prefix="elemta-instr-", dir=args.dir)
    port = free_port()
    as_nobody = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink will not run as root
    sink = subprocess.Popen(["smtp-sink", *as_nobody, "-c", f"127.0.0.1:{port}", "1024"],
                            stdout=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, __file__, "--tree", args.tree, "--fill", spool, "--size", str(args.size),
                        "-n", str(args.n)], check=True, timeout=600)
        wait_port(port)
        conf = config(args.tree, spool, args.log_level, relayhost=f"127.0.0.1:{port}")
        from elemta.assemble import build_scheduler
        from elemta.local import LocalRecipients
        from elemta.log import EventLog
        from elemta.queue.store import Store
        store = Store(conf.queue_path)
        store.open()
        scheduler = build_scheduler(conf, store, EventLog(conf.log.level, sink=lambda line: None),
                                    LocalRecipients.from_config(conf))
        scheduler.start()
        db = sqlite3.connect(conf.queue_path)
        deadline = time.monotonic() + 600
        while db.execute("select count(*) from recipients where state = 'delivered'").fetchone()[0] < args.n:
            if time.monotonic() > deadline:
                raise SystemExit("delivery did not finish in 600 s")
            time.sleep(0.1)  # a benchmark's polling, bounded; its own cost is the same at both counts
        db.close()
        scheduler.stop(5)
        store.close()
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(spool, ignore_errors=True)


def counted(args, part: str, n: int) -> int:
    """Instructions of one run of part with n messages, under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
               "--run", part, "-n", str(n), "--tree", args.tree, "--size", str(args.size),
               "--sessions", str(args.sessions), *(["--reuse"] if args.reuse else []), "--store", args.store, "--log-level", args.log_level,
               "--dir", args.dir]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or not found:
            raise SystemExit(f"{part} with {n} messages failed:\n{done.stderr[-2000:]}")
        return int(found.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="intake,delivery", help="intake, delivery or both")
    p.add_argument("--count", type=int, default=500, help="messages in the first run (the second: twice)")
    p.add_argument("--size", type=int, default=5120, help="message size (octets)")
    p.add_argument("--sessions", type=int, default=10, help="smtp-source sessions (intake)")
    p.add_argument("--reuse", action="store_true",
                   help="intake: connections reused (smtp-source -d); the difference is the cost of a connection")
    p.add_argument("--store", choices=("sqlite", "none"), default="sqlite",
                   help="intake: the real queue, or every message answered as stored at once")
    p.add_argument("--log-level", choices=("info", "warning"), default="info")
    p.add_argument("--tree", default=HERE, help="the elemta checkout to count (default: this one)")
    p.add_argument("--dir", default="/var/tmp", help="where the queues are made")
    p.add_argument("--run", choices=("intake", "delivery"), help=argparse.SUPPRESS)
    p.add_argument("--fill", help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--spool", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tree = os.path.abspath(args.tree)
    if args.fill:
        args.spool = args.fill
        fill(args)
        return 0
    if args.run == "intake":
        run_intake(args)
        return 0
    if args.run == "delivery":
        run_delivery(args)
        return 0
    for tool in ("valgrind", "smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install valgrind postfix)")
    print(f"elemta {args.tree}, {args.size} octets, log level {args.log_level}", flush=True)
    for part in args.parts.split(","):
        small, large = counted(args, part, args.count), counted(args, part, 2 * args.count)
        extra = f", {args.sessions} sessions, store {args.store}" if part == "intake" else ""
        print(f"{part}{extra}: {(large - small) / args.count:,.0f} instructions per message "
              f"({small:,} for {args.count}, {large:,} for {2 * args.count})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
