#!/usr/bin/python3
"""The DATA path in one process, without sockets: what receiving and storing a message costs
per message and per KB, and where the time goes.

    /usr/bin/python3 bench/data_path.py                      # session and store, 5 KB, 100 KB, 1 MB
    /usr/bin/python3 bench/data_path.py --profile session    # cProfile of the session at 100 KB
    /usr/bin/python3 bench/data_path.py --profile store --size 1048576
    /usr/bin/python3 bench/data_path.py --chunk 4096         # the text in 4 KiB reads

`session`: a sans-IO Session per message fed EHLO, MAIL, RCPT, DATA, then the message text as
smtp-source -l sends it (four header fields, an empty line, lines of 78 characters) in pieces
of --chunk octets, and QUIT; the Enqueue it asks for is answered as stored.  `store`: the
same NewMessage objects through Store.enqueue() one at a time, each its own transaction
(synchronous=FULL, so one fsync each) into a fresh queue in --dir.  Reported: CPU time of this
process (user + sys: time.process_time) per message, and the growth per KB between sizes.
No root, no network.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elemta.queue.store import Store  # noqa: E402
from elemta.smtp.session import Client, Enqueue, Services, Session, Settings  # noqa: E402

SIZES = (5120, 102400, 1048576)


def smtp_source_text(size: int) -> bytes:
    """A message as smtp-source -l size sends it: headers, then numbered 78-octet lines."""
    head = (b"From: <sender@example.com>\r\nTo: <rcpt@example.net>\r\n"
            b"Date: Sat, 5 Dec 2026 09:34:05 +0000 (UTC)\r\n"
            b"Message-Id: <4bc0.0003.0000@hold.example>\r\n\r\n")
    lines, n = [], 0
    while n < size:
        line = (str(len(lines) % 10).encode() + b"X" * 77)[: max(1, min(78, size - n))]
        lines.append(line)
        n += len(line) + 2
    return head + b"\r\n".join(lines) + b"\r\n"


def dialogue(size: int, chunk: int) -> list[bytes]:
    text = smtp_source_text(size) + b".\r\n"
    return ([b"EHLO client.example\r\n", b"MAIL FROM:<sender@example.com>\r\n",
             b"RCPT TO:<rcpt@example.net>\r\n", b"DATA\r\n"]
            + [text[i:i + chunk] for i in range(0, len(text), chunk)] + [b"QUIT\r\n"])


def new_session() -> Session:
    settings = Settings(hostname="bench.localdomain", relay_domains=frozenset({"example.net"}))
    services = Services(new_id=lambda: "0000000000000", log=lambda event, **fields: None)
    return Session(settings, Client("127.0.0.1", 4242, True, 1), services)


def receive(parts: list[bytes]):
    """One session through the dialogue; the NewMessage it asked to store."""
    session, message = new_session(), None
    session.greeting()
    for part in parts:
        out = session.feed(part)
        while out:
            item = out.pop(0)
            if isinstance(item, Enqueue):
                message = item.message
                out = session.enqueued(message) + out
    if message is None:
        raise SystemExit("the session stored nothing: the bench's dialogue is broken")
    return message


def time_session(size: int, chunk: int, count: int, rounds: int) -> float:
    """Median CPU seconds per message over rounds."""
    parts = dialogue(size, chunk)
    receive(parts)  # warm
    per = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(count):
            receive(parts)
        per.append((time.process_time() - t0) / count)
    return statistics.median(per)


def time_store(size: int, count: int, rounds: int, where: str) -> float:
    message = receive(dialogue(size, 65536))
    per = []
    for _ in range(rounds):
        spool = tempfile.mkdtemp(prefix="elemta-datapath-", dir=where)
        try:
            with Store(os.path.join(spool, "queue.db")) as store:
                msgs = [message.__class__(**{**message.__dict__, "queue_id": store.new_id()})
                        for _ in range(count + 1)]
                store.enqueue(msgs[0])
                t0 = time.process_time()
                for m in msgs[1:]:
                    store.enqueue(m)
                per.append((time.process_time() - t0) / count)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
    return statistics.median(per)


def count_for(size: int, base: int) -> int:
    return max(20, base * 102400 // size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="message sizes (octets)")
    p.add_argument("--size", type=int, default=102400, help="the size --profile uses")
    p.add_argument("--chunk", type=int, default=65536, help="octets per feed() (default: one recv)")
    p.add_argument("--count", type=int, default=500, help="messages per round at 100 KB (scaled by size)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--parts", default="session,store", help="session, store or both")
    p.add_argument("--dir", default="/var/tmp", help="where the store's queues are made")
    p.add_argument("--profile", choices=("session", "store"), help="cProfile one part at --size")
    args = p.parse_args(argv)
    if args.profile:
        prof = cProfile.Profile()
        if args.profile == "session":
            parts = dialogue(args.size, args.chunk)
            n = count_for(args.size, args.count)
            prof.runcall(lambda: [receive(parts) for _ in range(n)])
        else:
            n = count_for(args.size, args.count)
            prof.runcall(time_store, args.size, n, 1, args.dir)
        print(f"cProfile, {args.profile}, {n} messages of {args.size} octets; per-message times = tottime / {n}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = args.parts.split(",")
    results: dict[str, list[float]] = {}
    for part in parts:
        results[part] = []
        for size in sizes:
            n = count_for(size, args.count)
            if part == "session":
                t = time_session(size, args.chunk, n, args.rounds)
            else:
                t = time_store(size, n, args.rounds, args.dir)
            results[part].append(t)
            print(f"{part:8s} {size:>8} octets: {t * 1e6:9.1f} us CPU per message ({n} x {args.rounds})", flush=True)
    for part, times in results.items():
        slopes = [f"{sizes[i]}->{sizes[i + 1]}: {(times[i + 1] - times[i]) * 1e6 / ((sizes[i + 1] - sizes[i]) / 1024):.2f} us/KB"
                  for i in range(len(sizes) - 1)]
        print(f"{part:8s} per extra KB: {'   '.join(slopes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
