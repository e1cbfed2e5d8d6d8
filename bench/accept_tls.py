#!/usr/bin/python3
"""SMTP acceptance over TLS: elemta's msgs/s in plain SMTP, STARTTLS and implicit TLS, same run.

    /usr/bin/python3 bench/accept_tls.py --quick             # ~30 s: does it all work?
    /usr/bin/python3 bench/accept_tls.py --profile 10        # the figures in RESULTS.md, ~2.5 min
    /usr/bin/python3 bench/accept_tls.py --client-nodelay --handshakes 0   # without the ~40 ms stall

One elemta configuration for every run: an `mx` listener (plain SMTP, STARTTLS offered) and a
`submissions` listener (RFC 8314, TLS from the first byte), one RSA 2048 certificate made by
trustme in a temporary directory.  Three modes take the same load (message size, parallel
sessions, messages per run): `plain` (mx, no STARTTLS), `starttls` (mx, STARTTLS then EHLO again)
and `smtps` (the submissions listener; the bench client is in smtp.trusted_networks, 127.0.0.0/8
by default, so MAIL needs no AUTH).  Each mode with connections reused (every session sends its
share of the messages over one connection, like smtp-source -d) and with one message per
connection, where the handshakes dominate.  Every measured run gets a fresh elemta and spool;
modes alternate, the first rotating between repetitions.  Then the cost of one handshake:
sequential connections that only read the banner and QUIT, plain against TLS (and TLS resumed).
--profile runs py-spy on elemta under implicit-TLS load and looks for SSLContext creation.

The load generator is Python (raw sockets + ssl, one process per session, one client
SSLContext per process), not smtp-source, which has no TLS: its figures are not comparable
with accept.py's.  No root needed.  Loopback only; every process started here is stopped by
its PID.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queuemod
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import accept
from accept import HOSTNAME, BenchError, log, machine_busy, wait_count

MODES = ("plain", "starttls", "smtps")
HELO = b"hold.example"
MAIL = f"MAIL FROM:<{accept.SENDER}>\r\n".encode()
RCPT = f"RCPT TO:<{accept.RCPT}>\r\n".encode()


class SmtpError(Exception):
    """An unexpected reply."""


# ---- the client ----------------------------------------------------------------------------


# --client-nodelay, a diagnostic: the load generator sets TCP_NODELAY and asks its kernel for an
# immediate ACK before every read (TCP_QUICKACK, which is not sticky).  Without it a TLS
# connection waits ~40 ms once: elemta's sockets have Nagle on (no TCP_NODELAY), and after the
# handshake it writes the TLS 1.3 session tickets and then its next reply (the banner on 465,
# the EHLO reply after STARTTLS) as a second small segment, which Nagle holds until the client
# ACKs the tickets, and a client with nothing to send delays that ACK.  Real clients do not do
# this; the fix belongs in the server (TCP_NODELAY), and this shows what it would be worth.
QUICKACK = False


def quickack(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quickack(sock)


class Smtp:
    """A minimal blocking SMTP client on a (possibly TLS) socket; no pipelining."""

    def __init__(self, sock: socket.socket, quick: bool | None = None):
        self.sock = sock
        self.buf = b""
        self.quick = QUICKACK if quick is None else quick

    def reply(self) -> tuple[int, bytes]:
        while True:
            start = 0
            while (end := self.buf.find(b"\r\n", start)) >= 0:
                line = self.buf[start:end]
                start = end + 2
                if line[3:4] != b"-":
                    text, self.buf = self.buf[:start], self.buf[start:]
                    return int(line[:3]), text
            if self.quick:
                quickack(self.sock)
            data = self.sock.recv(65536)
            if not data:
                raise SmtpError(f"connection closed; got {self.buf[:80]!r}")
            self.buf += data

    def expect(self, want: int, what: bytes) -> bytes:
        code, text = self.reply()
        if code != want:
            raise SmtpError(f"{what.strip()[:20]!r}: {text[:120]!r}")
        return text

    def cmd(self, line: bytes, want: int) -> bytes:
        self.sock.sendall(line)
        return self.expect(want, line)


def client_context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)  # verifies chain and name, like a real client
    return context


def open_session(mode: str, port: int, context: ssl.SSLContext) -> Smtp:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if QUICKACK:
        nodelay(sock)
    if mode == "smtps":
        sock = context.wrap_socket(sock, server_hostname=HOSTNAME)
    s = Smtp(sock)
    s.expect(220, b"banner")
    ehlo = s.cmd(b"EHLO " + HELO + b"\r\n", 250)
    if mode == "starttls":
        if b"STARTTLS" not in ehlo:
            raise SmtpError("STARTTLS not offered")
        s.cmd(b"STARTTLS\r\n", 220)
        s.sock = context.wrap_socket(sock, server_hostname=HOSTNAME)
        s.cmd(b"EHLO " + HELO + b"\r\n", 250)
    return s


def send_message(s: Smtp, data: bytes) -> None:
    s.cmd(MAIL, 250)
    s.cmd(RCPT, 250)
    s.cmd(b"DATA\r\n", 354)
    s.sock.sendall(data)
    s.expect(250, b"end of data")


def close_session(s: Smtp) -> None:
    s.cmd(b"QUIT\r\n", 221)
    s.sock.close()


def message(size: int) -> bytes:
    """Headers and body of about `size` bytes, then the end-of-data line."""
    head = (f"From: <{accept.SENDER}>\r\nTo: <{accept.RCPT}>\r\nSubject: accept_tls bench\r\n"
            f"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n").encode()
    line = b"La de da de da " * 5 + b"\r\n"  # 77 bytes
    body = line * max(1, (size - len(head)) // len(line))
    return head + body + b".\r\n"


def worker(mode, port, reuse, size, cafile, remaining, ready, go, results) -> None:
    """One session (a process of its own): takes messages from `remaining` until none are left."""
    context = client_context(cafile)
    data = message(size)
    ready.put(os.getpid())
    go.wait()
    r0 = resource.getrusage(resource.RUSAGE_SELF)

    def take() -> bool:
        with remaining.get_lock():
            if remaining.value <= 0:
                return False
            remaining.value -= 1
            return True

    sent, conns, errors = 0, 0, []
    s = None
    try:
        while take():
            if s is None:
                s = open_session(mode, port, context)
                conns += 1
            send_message(s, data)
            sent += 1
            if not reuse:
                close_session(s)
                s = None
        if s is not None:
            close_session(s)
    except (OSError, SmtpError, ValueError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:200])
    end = time.monotonic()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    results.put({"sent": sent, "conns": conns, "errors": errors, "end": end, "cpu": cpu})


def load(server, mode: str, reuse: bool, size: int, sessions: int, count: int, cafile: str,
         timeout: float) -> dict:
    """`count` messages over `sessions` client processes; server CPU read just around the load."""
    mp = multiprocessing.get_context("fork")
    remaining = mp.Value("i", count)
    ready, results, go = mp.Queue(), mp.Queue(), mp.Event()
    port = server.ports["submissions" if mode == "smtps" else "mx"]
    procs = [mp.Process(target=worker, args=(mode, port, reuse, size, cafile, remaining, ready, go, results),
                        daemon=True) for _ in range(sessions)]
    done: list[dict] = []
    problems: list[str] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=30)
        busy0, cpu0 = machine_busy(), server.cpu()
        start = time.monotonic()
        go.set()
        deadline = start + timeout
        while len(done) < len(procs):
            try:
                done.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queuemod.Empty:
                problems.append(f"timed out after {timeout:.0f} s ({len(done)}/{len(procs)} sessions done)")
                break
        end = max((d["end"] for d in done), default=time.monotonic())
        cpu1, busy1 = server.cpu(), machine_busy()
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()  # by PID: only the client processes started above
                p.join(5)
    sent = sum(d["sent"] for d in done)
    client_cpu = sum(d["cpu"] for d in done)
    for d in done:
        problems += d["errors"]
    wall = end - start
    return {
        "wall_s": wall,
        "sent": sent,
        "connections": sum(d["conns"] for d in done),
        "msgs_per_s": sent / wall if wall > 0 else 0.0,
        "server_cpu_s": cpu1 - cpu0,
        "client_cpu_s": client_cpu,
        "other_cpu_s": max(0.0, busy1 - busy0 - (cpu1 - cpu0) - client_cpu),
        "problems": problems,
    }


# ---- elemta with a submissions listener and a certificate --------------------------------


class TlsElemta(accept.Elemta):
    """accept.py's elemta (fresh spool per round) plus a submissions listener and [tls]."""

    def __init__(self, cert_file: str, key_file: str, **kwargs):
        super().__init__(**kwargs)
        self.cert_file, self.key_file = cert_file, key_file
        self.ports: dict[str, int] = {}

    def config_text(self, spool: str) -> str:
        # Two listeners cannot both be 127.0.0.1:0 (an address may be listed once): the
        # submissions one gets a port picked here.
        self.smtps_port = accept.free_port()
        return super().config_text(spool).replace("# written by bench/accept.py",
                                                  "# written by bench/accept_tls.py") + f"""
[[listeners]]
address = "127.0.0.1:{self.smtps_port}"
role = "submissions"

[tls]
[[tls.certificates]]
cert_file = "{self.cert_file}"
key_file = "{self.key_file}"
"""

    def start(self) -> None:
        self.ports = {}
        super().start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in list(self.stdout_lines):
                m = re.match(r"elemta: listening on 127\.0\.0\.1:(\d+) \((\w+)\)", line)
                if m:
                    self.ports[m.group(2)] = int(m.group(1))
            if "mx" in self.ports and "submissions" in self.ports:
                return
            time.sleep(0.05)
        raise BenchError(f"elemta announced {self.ports}, not both listeners: {self.stdout_lines[-5:]}")


# ---- one measured run ----------------------------------------------------------------------


def measure(elemta: TlsElemta, mode: str, reuse: bool, size: int, sessions: int, count: int,
            cafile: str, timeout: float) -> dict:
    problems: list[str] = []
    elemta.begin_round()
    try:
        warm = min(count, max(2 * sessions, 20))
        w = load(elemta, mode, reuse, size, sessions, warm, cafile, timeout)
        base = wait_count(elemta, warm, settle=2.0)
        os.sync()
        time.sleep(0.5)
        r = load(elemta, mode, reuse, size, sessions, count, cafile, timeout)
        stored = wait_count(elemta, base + count) - base
        problems += [f"warm-up: {p}" for p in w["problems"]] + r["problems"]
        if base != warm:
            problems.append(f"MISMATCH in warm-up: sent {warm}, {base} in the queue")
        if r["sent"] != count or stored != count:
            problems.append(f"MISMATCH: {r['sent']} of {count} sent, {stored} in the queue")
        if not elemta.alive():
            problems.append("elemta is not running after the run")
    finally:
        problems += elemta.end_round()
    r.update(stored=stored, problems=problems, ok=not problems, notes=elemta.log_notes(),
             server_ms_per_msg=r["server_cpu_s"] / count * 1000,
             client_ms_per_msg=r["client_cpu_s"] / count * 1000)
    return r


# ---- handshakes ----------------------------------------------------------------------------


HANDSHAKES = {
    "plain": "plain connect",
    "tls": "TLS handshake (465)",
    "tls-qa": "TLS, client NODELAY+QUICKACK",
    "resumed-qa": "TLS resumed, NODELAY+QUICKACK",
}


def handshake_round(elemta: TlsElemta, kind: str, n: int, context: ssl.SSLContext) -> dict:
    """n sequential connections: (TLS handshake,) banner, QUIT, 221, close.

    tls-qa and resumed-qa: the client avoids the ~40 ms stall (see QUICKACK); resumed-qa offers the
    session (ticket) of the connection before it.
    """
    port = elemta.ports["mx" if kind == "plain" else "submissions"]
    quick = kind.endswith("-qa")
    session, resumed, info = None, 0, ""
    r0 = resource.getrusage(resource.RUSAGE_THREAD)
    cpu0 = elemta.cpu()
    start = time.monotonic()
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            if quick:
                nodelay(sock)
            if kind != "plain":
                sock = context.wrap_socket(sock, server_hostname=HOSTNAME,
                                           session=session if kind == "resumed-qa" else None)
            s = Smtp(sock, quick)
            s.expect(220, b"banner")  # under TLS 1.3 this also reads the session tickets
            s.cmd(b"QUIT\r\n", 221)
            if kind != "plain":
                info = f"{sock.version()} {sock.cipher()[0]}"
            if kind == "resumed-qa":
                resumed += sock.session_reused
                session = sock.session
        finally:
            sock.close()
    wall = time.monotonic() - start
    cpu1 = elemta.cpu()
    r1 = resource.getrusage(resource.RUSAGE_THREAD)
    client = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out = {"kind": kind, "n": n, "ms_per_conn": wall / n * 1000,
           "server_cpu_ms": (cpu1 - cpu0) / n * 1000, "client_cpu_ms": client / n * 1000}
    if info:
        out["tls"] = info
    if kind == "resumed-qa":
        out["resumed"] = resumed
    return out


def handshakes(elemta: TlsElemta, n: int, repeat: int, cafile: str) -> dict:
    """n connections per run of each kind; n/10 for "tls", which waits ~40 ms per connection."""
    context = client_context(cafile)  # one client context for all of them
    kinds = tuple(HANDSHAKES)
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    elemta.begin_round()
    problems: list[str] = []
    try:
        for kind in kinds:  # warm-up
            handshake_round(elemta, kind, 20, context)
        for rep in range(repeat):
            for i in range(len(kinds)):
                kind = kinds[(i + rep) % len(kinds)]
                r = handshake_round(elemta, kind, max(20, n // 10) if kind == "tls" else n, context)
                runs[kind].append(r)
                log(f"handshake {kind:10s} rep {rep + 1}/{repeat}: {r['n']} conns, {r['ms_per_conn']:.3f} ms/conn, "
                    f"elemta CPU {r['server_cpu_ms']:.3f} ms, client CPU {r['client_cpu_ms']:.3f} ms"
                    + (f", {r['resumed']} resumed" if kind == "resumed-qa" else ""))
    except (OSError, SmtpError) as exc:
        problems.append(f"handshakes: {type(exc).__name__}: {exc}")
    finally:
        problems += elemta.end_round()
    out: dict = {"n": n, "repeat": repeat, "runs": runs, "problems": problems}
    for kind in kinds:
        if runs[kind]:
            out[kind] = {key: statistics.median(r[key] for r in runs[kind])
                         for key in ("ms_per_conn", "server_cpu_ms", "client_cpu_ms")}
            out[kind]["n"] = runs[kind][0]["n"]
    if runs["tls"]:
        out["tls_version"] = runs["tls"][0]["tls"]
    if runs["resumed-qa"]:
        out["resumed_of"] = f"{min(r['resumed'] for r in runs['resumed-qa'])}/{n}"
    return out


# ---- profile -------------------------------------------------------------------------------

# Frames that would mean a context (and its certificate chain) is built for a connection.  py-spy
# names a frame "Class.function (file:line)" or "function (file:line)".
def frame(name: str, path: str) -> str:
    return rf"(^|\.){re.escape(name)} \(.*{re.escape(path)}:"


CONTEXT_FRAMES = (frame("_context", "elemta/smtp/tls.py"), frame("_build", "elemta/smtp/tls.py"),
                  frame("reload", "elemta/smtp/tls.py"), frame("__new__", "ssl.py"),
                  frame("create_default_context", "ssl.py"), r"load_cert_chain")


def profile(elemta: TlsElemta, seconds: int, out: str, size: int, sessions: int, cafile: str) -> dict:
    """py-spy record on elemta (and its delivery process) under smtps, one message per connection."""
    pyspy = shutil.which("py-spy")
    if not pyspy:
        return {"problems": ["py-spy not found"]}
    elemta.begin_round()
    problems: list[str] = []
    try:
        spy = subprocess.Popen([pyspy, "record", "-o", out, "-f", "raw", "--pid", str(elemta.pid),
                                "--subprocesses", "-d", str(seconds), "--nonblocking"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1)
            sent = 0
            while spy.poll() is None:
                r = load(elemta, "smtps", False, size, sessions, 500, cafile, 120)
                sent += r["sent"]
                problems += r["problems"]
            _, err = spy.communicate(timeout=30)
        finally:
            if spy.poll() is None:
                spy.terminate()  # by PID
                spy.wait(10)
        if spy.returncode != 0:
            problems.append(f"py-spy exited {spy.returncode}: {err.decode(errors='replace')[-300:]}")
    finally:
        problems += elemta.end_round()
    stacks: list[tuple[list[str], int]] = []
    try:
        with open(out) as f:
            for line in f:
                stack, _, n = line.rstrip("\n").rpartition(" ")
                if stack and n.isdigit():
                    stacks.append((stack.split(";"), int(n)))
    except OSError as exc:
        problems.append(f"cannot read {out}: {exc}")
    total = sum(n for _, n in stacks)

    def share(pattern: str) -> int:
        return sum(n for frames, n in stacks if any(re.search(pattern, f) for f in frames))

    context_hits = {p: share(p) for p in CONTEXT_FRAMES}
    # What _start_tls spends its samples in: the frame right below it, per stack.
    start_tls = re.compile(frame("_start_tls", "elemta/smtp/server.py"))
    below: dict[str, int] = {}
    for frames, n in stacks:
        for i, f in enumerate(frames):
            if start_tls.search(f):
                child = re.sub(r":\d+\)$", ")", frames[i + 1]) if i + 1 < len(frames) else "(itself)"
                below[child] = below.get(child, 0) + n
                break
    leaves: dict[str, int] = {}
    for frames, n in stacks:
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + n
    return {
        "file": out,
        "seconds": seconds,
        "messages": sent,
        "samples": total,
        "handle": share(frame("handle", "elemta/smtp/server.py")),
        "start_tls": share(frame("_start_tls", "elemta/smtp/server.py")),
        "do_handshake": share(frame("do_handshake", "ssl.py")),
        "wrap_socket": share(frame("wrap_socket", "ssl.py")),
        "tls_check": share(frame("check", "elemta/smtp/tls.py")),
        "top_leaves": sorted(leaves.items(), key=lambda kv: -kv[1])[:8],
        "below_start_tls": sorted(below.items(), key=lambda kv: -kv[1]),
        "context_creation": context_hits,
        "problems": problems,
    }


# ---- report --------------------------------------------------------------------------------


def format_table(cells: list[dict], size: int, sessions: int, count: dict, repeat: int, level: str,
                 quick: bool = False) -> str:
    head = (f"{'mode':>9} {'reuse':>5} | {'msgs/s':>8} {'vs plain':>8} | {'elemta CPU':>10} "
            f"{'client CPU':>10} | {'other':>5}")
    lines = [
        (f"elemta acceptance over TLS: {accept.fmt_size(size)} messages, {sessions} sessions, median of {repeat} "
        f"(log level {level}; {count[True]} msgs per run reused, {count[False]} one per connection"
        f"{'; client TCP_NODELAY+TCP_QUICKACK' if quick else ''})"),
        f"{'':>15} | {'':>17} | {'ms per message':^21} |",
        head,
        "-" * len(head),
    ]
    for reuse in (True, False):
        plain = next((c for c in cells if c["reuse"] == reuse and c["mode"] == "plain"), None)
        for c in cells:
            if c["reuse"] != reuse:
                continue
            ratio = c["msgs_per_s"] / plain["msgs_per_s"] if plain and plain["msgs_per_s"] else 0.0
            bad = "" if all(r["ok"] for r in c["runs"]) else "  (!)"
            lines.append(
                f"{c['mode']:>9} {'-d' if reuse else 'no':>5} | {c['msgs_per_s']:>8.1f} {ratio:>7.2f}x |"
                f" {c['server_ms_per_msg']:>10.3f} {c['client_ms_per_msg']:>10.3f} | {c['other']:>4.0%}{bad}"
            )
    lines.append("-d: each session sends its messages over one connection; no: one message per connection.")
    lines.append("other: most CPU, in % of all CPUs, used by neither elemta nor the clients in a run; (!): a run failed")
    return "\n".join(lines)


def format_handshakes(h: dict) -> str:
    lines = [(f"Handshakes: sequential connections (banner, QUIT), median of {h['repeat']} runs"
             f" ({h.get('tls_version', '?')}, RSA 2048 certificate)"),
             f"{'':>30} {'conns':>5} {'ms/conn':>8} {'elemta CPU ms':>14} {'client CPU ms':>14}"]
    for kind, name in HANDSHAKES.items():
        if kind in h:
            k = h[kind]
            extra = f"  ({h['resumed_of']} resumed)" if kind == "resumed-qa" else ""
            lines.append(f"{name:>30} {k['n']:>5} {k['ms_per_conn']:>8.3f} {k['server_cpu_ms']:>14.3f}"
                         f" {k['client_cpu_ms']:>14.3f}{extra}")
    if "plain" in h:
        lines.append("one handshake (minus plain):")
        p = h["plain"]
        for kind, name in HANDSHAKES.items():
            if kind != "plain" and kind in h:
                t = h[kind]
                lines.append(f"{name:>30} {'':>5} {t['ms_per_conn'] - p['ms_per_conn']:>8.3f}"
                             f" {t['server_cpu_ms'] - p['server_cpu_ms']:>14.3f}"
                             f" {t['client_cpu_ms'] - p['client_cpu_ms']:>14.3f}")
    return "\n".join(lines)


def format_profile(p: dict) -> str:
    if not p.get("samples"):
        return f"profile: no samples ({p.get('problems')})"
    t = p["samples"]
    ctx = sum(p["context_creation"].values())
    return (f"py-spy on elemta, {p['seconds']} s of smtps with one message per connection ({p['messages']} msgs), "
            f"{t} samples (not idle): in handle() {p['handle'] / t:.0%}, _start_tls {p['start_tls'] / t:.0%}, "
            f"SSLSocket.do_handshake {p['do_handshake'] / t:.0%}, SSLContext.wrap_socket {p['wrap_socket'] / t:.0%}, "
            f"ServerTls.check {p['tls_check']}; frames that build an SSLContext or load a certificate "
            f"(tls._context, tls._build, ServerTls.reload, SSLContext.__new__, create_default_context, "
            f"load_cert_chain): {ctx} "
            f"samples; raw profile in {p['file']}\n  top frames (own time): "
            + ", ".join(f"{name} {n / t:.0%}" for name, n in p["top_leaves"])
            + "\n  called from _start_tls (samples): "
            + (", ".join(f"{name} {n}" for name, n in p["below_start_tls"]) or "none"))


# ---- main ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, one repetition")
    p.add_argument("--size", type=int, default=5120, metavar="B", help="message size in bytes (default 5120)")
    p.add_argument("--sessions", type=int, default=10, metavar="S", help="parallel sessions (default 10)")
    p.add_argument("--count", type=int, metavar="N", help="messages per run, connections reused (default 10000)")
    p.add_argument("--count-single", type=int, metavar="N",
                   help="messages per run, one per connection (default 1500)")
    p.add_argument("--repeat", type=int, metavar="R", help="runs per mode (default 3; --quick 1)")
    p.add_argument("--reuse", choices=("both", "no", "yes"), default="both",
                   help="connections reused (yes), one message per connection (no), or both")
    p.add_argument("--modes", default=",".join(MODES), metavar="M,M",
                   help=f"which of {','.join(MODES)} to run (default all)")
    p.add_argument("--handshakes", type=int, metavar="N", help="connections per handshake run (default 1000, a tenth of it for the TLS run that "
                        "waits on delayed ACKs; 0: none)")
    p.add_argument("--client-nodelay", action="store_true",
                   help="diagnostic: the load generator sets TCP_NODELAY and TCP_QUICKACK in every mode, "
                        "so elemta's Nagle/delayed-ACK stall after a TLS handshake does not show")
    p.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default="auto", metavar="N",
                   help="elemta's server.workers (default auto, elemta's own)")
    p.add_argument("--log-level", choices=("info", "warning"), default="info")
    p.add_argument("--profile", type=int, metavar="SECONDS",
                   help="also py-spy record elemta for this long under smtps load (one message per connection)")
    p.add_argument("--profile-out", default="/tmp/elemta-tls-profile.txt", metavar="FILE")
    p.add_argument("--max-other", type=float, default=0.25, metavar="F",
                   help="run again if more than this share of the CPUs went to other work (default 0.25)")
    p.add_argument("--retries", type=int, default=1, metavar="N")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if not os.access(accept.ELEMTA, os.X_OK):
        p.error(f"{accept.ELEMTA} is missing or not executable")
    try:
        import trustme
    except ImportError:
        p.error("needs trustme (apt-get install python3-trustme)")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    global QUICKACK
    QUICKACK = args.client_nodelay

    repeat = args.repeat or (1 if args.quick else 3)
    count = {True: args.count or (600 if args.quick else 10000),
             False: args.count_single or (300 if args.quick else 1500)}
    n_hs = args.handshakes if args.handshakes is not None else (100 if args.quick else 1000)
    reuses = {"both": (True, False), "no": (False,), "yes": (True,)}[args.reuse]
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    if not modes:
        p.error(f"--modes: pick from {','.join(MODES)}")
    cpus = os.cpu_count() or 1

    certdir = tempfile.mkdtemp(prefix="elemta-bench-tls-")
    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    cert_file, key_file, cafile = (os.path.join(certdir, n) for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(cert_file)
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(cert_file, append=True)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(cafile)
    # The service user (accept.SERVICE_USER) reads them; a key others can read stops elemta.
    os.chmod(certdir, 0o755)
    os.chmod(cert_file, 0o644)
    os.chmod(key_file, 0o600)
    if os.geteuid() == 0:
        import pwd
        os.chown(key_file, pwd.getpwnam(accept.SERVICE_USER).pw_uid, -1)

    elemta = TlsElemta(cert_file, key_file, log_level=args.log_level, workers=args.workers)
    cells: list[dict] = []
    failures: list[str] = []
    notes: list[str] = []
    hs: dict = {}
    prof: dict = {}
    started = time.time()
    try:
        for reuse in reuses:
            n = count[reuse]
            timeout = 60 + n / 20
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for rep in range(repeat):
                for i in range(len(modes)):
                    mode = modes[(i + rep) % len(modes)]
                    label = f"{mode:8s} {'-d' if reuse else 'no'} rep {rep + 1}/{repeat}"
                    for attempt in range(args.retries + 1):
                        try:
                            r = measure(elemta, mode, reuse, args.size, args.sessions, n, cafile, timeout)
                        except (BenchError, OSError, queuemod.Empty) as exc:
                            if elemta.proc is not None:
                                elemta.stop(keep=True)
                            r = {"msgs_per_s": 0.0, "wall_s": 0.0, "server_cpu_s": 0.0, "client_cpu_s": 0.0,
                                 "other_cpu_s": 0.0, "server_ms_per_msg": 0.0, "client_ms_per_msg": 0.0,
                                 "ok": False, "problems": [f"{type(exc).__name__}: {exc}"], "notes": []}
                        busy = r["other_cpu_s"] / (r["wall_s"] * cpus) if r["wall_s"] else 0.0
                        r["other"] = busy
                        log(f"{label} {r['msgs_per_s']:8.1f} msgs/s  wall {r['wall_s']:6.2f} s"
                            f"  elemta cpu {r['server_cpu_s']:5.2f} s  client cpu {r['client_cpu_s']:5.2f} s"
                            f"  other {busy:4.0%}")
                        for prob in r["problems"]:
                            log(f"    problem: {prob}")
                        notes += [f"{label}: {x}" for x in r["notes"]]
                        if r["problems"] or busy <= args.max_other or attempt == args.retries:
                            break
                        log(f"    {busy:.0%} of the CPUs went to something else during the run: again")
                    failures += [f"{label}: {prob}" for prob in r["problems"]]
                    runs[mode].append(r)
            for mode in modes:
                rs = runs[mode]
                cells.append({
                    "mode": mode, "reuse": reuse, "count": n, "runs": rs,
                    "msgs_per_s": statistics.median(r["msgs_per_s"] for r in rs),
                    "server_ms_per_msg": statistics.median(r["server_ms_per_msg"] for r in rs),
                    "client_ms_per_msg": statistics.median(r["client_ms_per_msg"] for r in rs),
                    "other": max(r["other"] for r in rs),
                })
        if n_hs:
            hs = handshakes(elemta, n_hs, repeat, cafile)
            failures += hs["problems"]
        if args.profile:
            prof = profile(elemta, args.profile, args.profile_out, args.size, args.sessions, cafile)
            failures += [f"profile: {x}" for x in prof["problems"]]
    except BenchError as exc:
        failures.append(f"aborted: {exc}")
        log(f"ABORTED: {exc}")
    except KeyboardInterrupt:
        failures.append("interrupted")
        log("interrupted; cleaning up")
    finally:
        if elemta.proc is not None:
            elemta.stop()
        shutil.rmtree(certdir, ignore_errors=True)

    report = [format_table(cells, args.size, args.sessions, count, repeat, args.log_level,
                           args.client_nodelay)] if cells else []
    if hs.get("plain"):
        report.append(format_handshakes(hs))
    if prof:
        report.append(format_profile(prof))
    print("\n\n".join(report))
    if notes:
        print(f"\n{len(notes)} elemta log line(s) of warning level or worse (first 30):")
        for x in notes[:30]:
            print(f"  {x}")
    if failures:
        print(f"\n{len(failures)} problem(s):")
        for f in failures:
            print(f"  {f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "smtp-acceptance-tls", "seconds": round(time.time() - started, 1),
                       "machine": accept.machine_info(), "size": args.size, "sessions": args.sessions,
                       "counts": {"reused": count[True], "single": count[False]}, "repeat": repeat,
                       "client_nodelay": args.client_nodelay,
                       "cells": cells, "handshakes": hs, "profile": prof, "problems": failures,
                       "log_notes": notes}, f, indent=2)
        log(f"results written to {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
