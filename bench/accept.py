#!/usr/bin/python3
"""SMTP acceptance throughput: elemta against Postfix, with Postfix's smtp-source as the load.

Run as root from anywhere (see bench/README.md):

    /usr/bin/python3 bench/accept.py              # full run, ~6-10 minutes on 2 cores
    /usr/bin/python3 bench/accept.py --quick      # every cell once, small counts
    /usr/bin/python3 bench/accept.py --idle 2000  # elemta's RSS with 2,000 idle connections

For every cell (message size x parallel sessions x connection reuse) both servers take the same
smtp-source load `--repeat` times, alternately, the first of the pair rotating between
repetitions.  Reported per system: median msgs/s (messages / wall time of smtp-source) and the
median CPU seconds (user+sys) its server process tree used per 1,000 messages.  Every message
is counted in the server's queue afterwards; any shortfall or smtp-source error is reported and
the exit status is 1.

Loopback only: every socket is on 127.0.0.1.  Postfix is started and stopped only with
`postfix start` / `postfix stop`, its main.cf/master.cf are restored at the end, and every other
process this script starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
ELEMTA = os.path.join(CHECKOUT, "bin", "elemta")

POSTFIX_CONF = "/etc/postfix"
POSTFIX_SPOOL = "/var/spool/postfix"
POSTFIX_LOG = "/var/log/postfix-bench.log"
# A copy of main.cf/master.cf while the bench configuration is in place; if it exists when the
# script starts, an earlier run died before restoring them and this one restores them first.
POSTFIX_BACKUP = "/var/tmp/elemta-bench-postfix-conf"
SPOOL_PARENT = "/var/tmp"  # same file system as /var/spool/postfix on a usual install
# Started as root, elemta runs as this user, as it does in production (as root: nobody, for
# which the bench's directory and config are made readable).
SERVICE_USER = "nobody" if os.geteuid() == 0 else "root"

HELO = "hold.example"  # Postfix puts mail from this HELO on hold (smtpd_data_restrictions)
SENDER = "sender@example.com"
RCPT = "rcpt@example.net"
HOSTNAME = "bench.localdomain"

SIZES = (5120, 102400)
SESSIONS = (1, 10, 50)
DEFAULT_COUNT = {5120: 5000, 102400: 2000}  # a few seconds per run at ~500-2,500 msgs/s
QUICK_COUNT = {5120: 300, 102400: 100}

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something that stops the whole run (setup failure, a server that won't start)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 120, check: bool = True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


# ---- /proc ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, state, is index 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def tree_cpu(root: int) -> float:
    """CPU seconds (user+sys) used so far by root and all its descendants.

    Sum over the live processes of the tree of their own utime+stime plus cutime+cstime (what
    their reaped children used).  A child that exits between two readings moves from its own
    line to its parent's cutime, so differences of two readings are right as long as each
    process is reaped by a parent inside the tree, which is how Postfix's master works.
    """
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        pid = int(name)
        parents[pid] = int(fields[1])
        # utime, stime, cutime, cstime are fields 14-17 of stat: indexes 11-14 here.
        times[pid] = sum(int(x) for x in fields[11:15])
    if root not in times:
        return 0.0
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all CPUs spent not idle (from /proc/stat), to see who else was busy."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kb(pid: int) -> int:
    """The resident memory of elemta's whole process tree (supervisor, workers, delivery,
    monitor): the sum of their RSS, which counts pages they share after fork once per process."""
    return sum(_memory(p)[0] for p in _tree(pid))


def pss_kb(pid: int) -> int:
    """The same tree's proportional set size: each shared page divided among its sharers."""
    return sum(_memory(p)[1] for p in _tree(pid))


def tree_threads(pid: int) -> int:
    return sum(int(proc_status(p)["Threads"]) for p in _tree(pid))


def _tree(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
        found.append(pid)
    return found


def _memory(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in KiB from /proc/PID/smaps_rollup; (0, 0) if it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0])
    except OSError:
        return 0, 0
    return values.get("Rss", 0), values.get("Pss", 0)


def pid_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


# ---- load generator ------------------------------------------------------------------------


def smtp_source(port: int, count: int, size: int, sessions: int, reuse: bool, timeout: float,
                helo: str = HELO, extra: tuple = ()) -> dict:
    """Run smtp-source once; wall time, its own CPU, exit status and stderr lines."""
    cmd = ["smtp-source", "-4", *extra]
    if reuse:
        cmd.append("-d")
    cmd += ["-s", str(sessions), "-m", str(count), "-l", str(size), "-M", helo,
            "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        # wait4, not Popen.wait, to get the load generator's own CPU use.
        deadline = start + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").splitlines()
    return {
        "cmd": " ".join(cmd),
        "wall": wall,
        "client_cpu": usage.ru_utime + usage.ru_stime,
        "exit": proc.returncode,
        "timed_out": timed_out,
        "stderr": lines,
    }


# ---- Postfix -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_banner(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


class Postfix:
    name = "postfix"

    def __init__(self, port: int):
        self.port = port
        self.started = False
        self.configured = False
        self.version = ""
        self._log_offset = 0

    @staticmethod
    def running() -> bool:
        return subprocess.run(["postfix", "status"], capture_output=True).returncode == 0

    @staticmethod
    def ensure_installed() -> None:
        if shutil.which("postfix") and shutil.which("smtp-source"):
            return
        log("postfix: not installed; installing it (apt-get update, apt-get install postfix)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "postfix"], timeout=900, env=env)
        if not (shutil.which("postfix") and shutil.which("smtp-source")):
            raise BenchError("postfix installed but postfix/smtp-source not on PATH")

    def main_cf(self) -> list[str]:
        """main.cf settings for an acceptance-only run: mail from HELO hold.example is held."""
        return [
             f"myhostname = {HOSTNAME}", "mydestination =",
             "inet_interfaces = 127.0.0.1", "inet_protocols = ipv4",
             # Nothing should leave the held queue; if something did, it would go to a closed
             # loopback port and stay deferred (defer_transports), never to the network.
             "relayhost = [127.0.0.1]:9", "defer_transports = smtp, relay",
             "mynetworks = 127.0.0.0/8",
             "disable_dns_lookups = yes", "smtp_host_lookup = native",
             "smtpd_relay_restrictions = permit_mynetworks, reject",
             "local_recipient_maps =", "alias_maps =", "alias_database =",
             f"maillog_file = {POSTFIX_LOG}",
             f"smtpd_data_restrictions = check_helo_access inline:{{ {HELO}=HOLD }}",
        ]

    def setup(self) -> None:
        self.ensure_installed()
        if os.path.isdir(POSTFIX_BACKUP):
            log(f"postfix: {POSTFIX_BACKUP} exists: an earlier run did not finish; restoring its config")
            if self.running():
                run(["postfix", "stop"])
            self._restore()
        if self.running():
            raise BenchError("postfix is already running and was not started by this script; "
                             "stop it (postfix stop) and run again")
        os.makedirs(POSTFIX_BACKUP)
        for name in ("main.cf", "master.cf"):
            shutil.copy2(os.path.join(POSTFIX_CONF, name), os.path.join(POSTFIX_BACKUP, name))
        self.configured = True
        run(["postconf", "-e", *self.main_cf()])
        run(["postconf", "-M#", "smtp/inet"])
        run(["postconf", "-M", f"{self.port}/inet = 127.0.0.1:{self.port} inet n - n - - smtpd"])
        run(["postconf", "-F", "*/*/chroot = n"])
        self.version = run(["postconf", "-h", "mail_version"]).stdout.strip()
        check = run(["postfix", "check"], check=False)
        if check.returncode != 0:
            raise BenchError(f"postfix check failed: {check.stderr.strip()}")
        self._log_offset = os.path.getsize(POSTFIX_LOG) if os.path.exists(POSTFIX_LOG) else 0
        self.started = True  # from here on teardown runs `postfix stop`, even if start fails
        run(["postfix", "start"], timeout=60)
        # Only now: with maillog_file set, postsuper logs through postlogd, which must be up.
        self.clear()
        if not wait_banner(self.port, 20):
            raise BenchError(f"postfix started but 127.0.0.1:{self.port} gives no banner (see {POSTFIX_LOG})")

    def _restore(self) -> None:
        for name in ("main.cf", "master.cf"):
            src = os.path.join(POSTFIX_BACKUP, name)
            if os.path.exists(src):
                shutil.copy2(src, os.path.join(POSTFIX_CONF, name))
        shutil.rmtree(POSTFIX_BACKUP, ignore_errors=True)

    def teardown(self) -> None:
        if self.started:
            try:
                self.clear()
            except Exception as exc:  # noqa: BLE001 - teardown goes on regardless
                log(f"postfix: clearing the hold queue failed: {exc}")
            proc = run(["postfix", "stop"], check=False, timeout=120)
            if proc.returncode != 0:
                log(f"postfix stop exited {proc.returncode}: {proc.stderr.strip()}")
            self.started = False
        if self.configured:
            self._restore()
            self.configured = False

    def master_pid(self) -> int:
        with open(os.path.join(POSTFIX_SPOOL, "pid", "master.pid")) as f:
            return int(f.read().split()[0])

    def cpu(self) -> float:
        return tree_cpu(self.master_pid())

    def alive(self) -> bool:
        try:
            return pid_alive(self.master_pid())
        except (OSError, ValueError):
            return False

    @staticmethod
    def queue_count(queue: str) -> int:
        n = 0
        for _, _, files in os.walk(os.path.join(POSTFIX_SPOOL, queue)):
            n += len(files)
        return n

    def stored(self) -> int:
        return self.queue_count("hold")

    def other_queues(self) -> dict[str, int]:
        return {q: self.queue_count(q) for q in ("maildrop", "incoming", "active", "deferred")}

    def clear(self) -> None:
        run(["postsuper", "-d", "ALL", "hold"], timeout=300)

    def log_notes(self) -> list[str]:
        """warning/error/fatal/panic lines Postfix logged since the last call (first 20)."""
        try:
            with open(POSTFIX_LOG, errors="replace") as f:
                f.seek(self._log_offset)
                text = f.read()
                self._log_offset = f.tell()
        except OSError:
            return []
        lines = [ln for ln in text.splitlines() if re.search(r"\b(warning|error|fatal|panic):", ln)]
        return lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])

    # Postfix runs for the whole benchmark; a "round" is one measured run in it.
    def begin_round(self) -> None:
        pass

    def end_round(self) -> list[str]:
        self.clear()
        return []


# ---- elemta --------------------------------------------------------------------------------


class Elemta:
    name = "elemta"

    def __init__(self, log_level: str = "warning", max_connections: int = 10000, workers: int | str = "auto",
                 monitor: bool = True, binary: str = ELEMTA):
        self.binary = binary  # bin/elemta of this checkout, or of another tree to compare with
        self.monitor = monitor  # the [monitor] endpoint and its metrics, on by default
        self.log_level = log_level
        self.workers = workers
        self.max_connections = max_connections
        self.proc: subprocess.Popen | None = None
        self.workdir = ""
        self.port = 0
        self.notes: list[str] = []  # stderr lines of warning level or worse

    def config_text(self, spool: str) -> str:
        return f"""# written by bench/accept.py
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
hostname = "{HOSTNAME}"
spool_dir = "{spool}"
user = "{SERVICE_USER}"
max_connections = {self.max_connections}
max_connections_per_ip = {self.max_connections}
workers = {self.workers if isinstance(self.workers, int) else '"' + self.workers + '"'}

[smtp]
relay_domains = ["example.net"]

[queue]
min_free_space = 0

[delivery]
hold = true

[log]
level = "{self.log_level}"

[monitor]
listen = "{'127.0.0.1:0' if self.monitor else ''}"
"""

    def start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="elemta-bench-", dir=SPOOL_PARENT)
        os.chmod(self.workdir, 0o755)  # the service user makes its spool in it
        spool = os.path.join(self.workdir, "spool")
        conf = os.path.join(self.workdir, "elemta.toml")
        with open(conf, "w") as f:
            f.write(self.config_text(spool))
        os.chmod(conf, 0o644)
        self.stderr_path = os.path.join(self.workdir, "stderr.log")
        self.stdout_lines: list[str] = []
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [self.binary, "--config", conf], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=err, cwd=self.workdir, text=True,
            )
        got_port = threading.Event()

        def drain():
            for line in self.proc.stdout:
                self.stdout_lines.append(line.rstrip("\n"))
                m = re.match(r"elemta: listening on 127\.0\.0\.1:(\d+) ", line)
                if m and not got_port.is_set():
                    self.port = int(m.group(1))
                    got_port.set()
            got_port.set()

        threading.Thread(target=drain, daemon=True).start()
        if not got_port.wait(30) or not self.port:
            code = self.proc.poll()
            tail = self._stderr_tail()
            self.stop(keep=True)
            raise BenchError(
                f"elemta did not announce its port (exit {code}); stdout: {self.stdout_lines[-5:]}, "
                f"stderr: {tail}; files kept in {self.workdir}"
            )
        self.spool = spool

    def _stderr_tail(self, n: int = 10) -> list[str]:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return [ln.rstrip() for ln in f.readlines()[-n:]]
        except OSError:
            return []

    def stop(self, keep: bool = False) -> list[str]:
        """SIGTERM, wait for exit (SIGKILL by PID after 60 s); remove the spool unless keep.

        Returns failures (a non-zero exit, a kill); stderr lines go to self.notes.
        """
        failures = []
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    failures.append("elemta did not exit within 60 s of SIGTERM; killed")
                    self.proc.kill()
                    self.proc.wait(10)
            code = self.proc.returncode
            if code != 0 and not failures:
                failures.append(f"elemta exited {code} after SIGTERM")
            if self.log_level == "warning":
                lines = self._stderr_tail(10000)
            else:
                lines = [ln for ln in self._stderr_tail(10000)
                         if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback|error)\b", ln)]
            self.notes += lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
            self.proc = None
        if self.workdir and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""
        return failures

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def stored(self) -> int:
        path = os.path.join(self.spool, "queue.db")
        if not os.path.exists(path):
            return 0
        db = sqlite3.connect(path, timeout=30)
        try:
            return db.execute("select count(*) from messages").fetchone()[0]
        finally:
            db.close()

    def log_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    # A fresh elemta (and spool) for every measured run.
    def begin_round(self) -> None:
        self.start()

    def end_round(self) -> list[str]:
        return self.stop()


# ---- one measured run ----------------------------------------------------------------------


def wait_count(server, expected: int, settle: float = 5.0) -> int:
    """The server's stored count; polled briefly in case a write is still landing."""
    deadline = time.monotonic() + settle
    while True:
        n = server.stored()
        if n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def measure(server, size: int, sessions: int, reuse: bool, count: int, timeout: float) -> dict:
    """One measured run.  problems: failures (exit status 1); notes: server log lines."""
    problems: list[str] = []
    server.begin_round()
    try:
        port = server.port
        # Warm-up: the same kind of load, small; lets Postfix spawn its smtpd processes and
        # elemta open its queue before the clock starts.  Its messages are counted in `base`.
        warm = min(count, max(2 * sessions, 20))
        w = smtp_source(port, warm, size, sessions, reuse, timeout)
        base = wait_count(server, warm, settle=2.0)
        os.sync()
        time.sleep(0.5)
        busy0, cpu0 = machine_busy(), server.cpu()
        r = smtp_source(port, count, size, sessions, reuse, timeout)
        cpu1, busy1 = server.cpu(), machine_busy()
        stored = wait_count(server, base + count) - base
        if w["exit"] or w["stderr"]:
            problems.append(f"warm-up smtp-source exit {w['exit']}: {' | '.join(w['stderr'][:5])}")
        if base != warm:
            problems.append(f"MISMATCH in warm-up: sent {warm}, {base} in the queue")
        if r["timed_out"]:
            problems.append(f"smtp-source timed out after {timeout:.0f} s and was killed")
        if r["exit"] or r["stderr"]:
            problems.append(f"smtp-source exit {r['exit']}: {' | '.join(r['stderr'][:10])}")
        if stored != count:
            extra = f"; other postfix queues {server.other_queues()}" if isinstance(server, Postfix) else ""
            problems.append(f"MISMATCH: sent {count}, {stored} in the queue{extra}")
        if not server.alive():
            problems.append(f"{server.name} is not running after the run")
    finally:
        problems += server.end_round()
    return {
        "msgs_per_s": count / r["wall"],
        "wall_s": r["wall"],
        "server_cpu_s": cpu1 - cpu0,
        "cpu_s_per_1000": (cpu1 - cpu0) / count * 1000,
        "client_cpu_s": r["client_cpu"],
        # CPU the machine spent on anything but the server tree and smtp-source during the run
        # (kernel work done outside process context, and other processes: should be small).
        "other_cpu_s": max(0.0, busy1 - busy0 - (cpu1 - cpu0) - r["client_cpu"]),
        "stored": stored,
        "ok": not problems,
        "problems": problems,
        "notes": server.log_notes(),
    }


def measure_safely(server, elemta, *args) -> dict:
    """measure(), with a failure to run at all turned into a failed result."""
    try:
        return measure(server, *args)
    except (BenchError, OSError, sqlite3.Error, subprocess.SubprocessError) as exc:
        if server is elemta and elemta.proc is not None:
            elemta.stop(keep=True)
        return {"msgs_per_s": 0.0, "wall_s": 0.0, "server_cpu_s": 0.0, "cpu_s_per_1000": 0.0,
                "client_cpu_s": 0.0, "other_cpu_s": 0.0, "stored": 0, "ok": False,
                "problems": [f"{type(exc).__name__}: {exc}"], "notes": server.log_notes()}


# ---- throughput mode -----------------------------------------------------------------------


def fmt_size(size: int) -> str:
    return f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"


def throughput(args) -> int:
    counts = dict(QUICK_COUNT if args.quick else DEFAULT_COUNT)
    for size in args.sizes:
        counts.setdefault(size, max(100, 10_240_000 // size))
    if args.count:
        counts = {size: args.count for size in args.sizes}
    if args.count_large:
        for size in args.sizes:
            if size > 10240:
                counts[size] = args.count_large
    repeat = args.repeat if args.repeat else (1 if args.quick else 3)
    reuses = {"both": (False, True), "no": (False,), "yes": (True,)}[args.reuse]
    cells = [(size, s, reuse) for size in args.sizes for s in args.sessions for reuse in reuses]

    deadline = time.monotonic() + args.budget * 60
    postfix = Postfix(args.postfix_port or free_port())
    elemta = Elemta(log_level=args.log_level, workers=args.workers)
    results, failures, notes = [], [], []
    cpus = os.cpu_count() or 1
    started = time.time()
    try:
        postfix.setup()
        log(f"postfix {postfix.version} on 127.0.0.1:{postfix.port}; elemta {ELEMTA}; "
            f"{len(cells)} cells x {repeat} repetitions")
        for index, (size, sessions, reuse) in enumerate(cells):
            if time.monotonic() > deadline:
                failures.append(f"time budget of {args.budget} min used up: cells from #{index + 1} skipped")
                log(failures[-1])
                break
            count = counts[size]
            timeout = 60 + count / 20  # bound: smtp-source is killed below ~20 msgs/s
            cell = {"size": size, "sessions": sessions, "reuse": reuse, "count": count,
                    "postfix": [], "elemta": []}
            for rep in range(repeat):
                order = (postfix, elemta) if (rep + index) % 2 == 0 else (elemta, postfix)
                for server in order:
                    label = f"{fmt_size(size)} s={sessions}{' -d' if reuse else ''} rep {rep + 1}/{repeat}"
                    for attempt in range(args.retries + 1):
                        m = measure_safely(server, elemta, size, sessions, reuse, count, timeout)
                        m["first"] = server is order[0]
                        m["attempt"] = attempt + 1
                        busy = m["other_cpu_s"] / (m["wall_s"] * cpus) if m["wall_s"] else 0.0
                        log(f"[{index + 1}/{len(cells)}] {label} {server.name:7s} {m['msgs_per_s']:8.1f} msgs/s"
                            f"  wall {m['wall_s']:6.2f} s  cpu {m['server_cpu_s']:6.2f} s"
                            f"  client cpu {m['client_cpu_s']:5.2f} s  other {busy:4.0%}"
                            f"  stored {m['stored']}/{count}")
                        for p in m["problems"]:
                            log(f"    {server.name}: {p}")
                        for n in m["notes"]:
                            log(f"    {server.name} log: {n}")
                        notes += [f"{label} {server.name}: {n}" for n in m["notes"]]
                        if m["problems"] or busy <= args.max_other or attempt == args.retries:
                            break
                        log(f"    {busy:.0%} of the CPUs went to something else during the run: again")
                        cell.setdefault(f"{server.name}_discarded", []).append(m)
                    failures += [f"{label} {server.name}: {p}" for p in m["problems"]]
                    cell[server.name].append(m)
                    if not postfix.alive():
                        raise BenchError("postfix master is gone")
            for name in ("postfix", "elemta"):
                runs = cell[name]
                cell[f"{name}_msgs_per_s"] = statistics.median(r["msgs_per_s"] for r in runs)
                cell[f"{name}_cpu_per_1000"] = statistics.median(r["cpu_s_per_1000"] for r in runs)
            pf = cell["postfix_msgs_per_s"]
            cell["ratio"] = cell["elemta_msgs_per_s"] / pf if pf else None
            results.append(cell)
    except BenchError as exc:
        failures.append(f"aborted: {exc}")
        log(f"ABORTED: {exc}")
    except KeyboardInterrupt:
        failures.append("interrupted")
        log("interrupted; cleaning up")
    finally:
        if elemta.proc is not None:
            elemta.stop()
        postfix.teardown()

    table = format_table(results, elemta.log_level)
    print(table)
    if notes:
        print(f"\n{len(notes)} server log line(s) of warning level or worse (first 30):")
        for n in notes[:30]:
            print(f"  {n}")
    mismatches = [f for f in failures if "MISMATCH" in f]
    if failures:
        print(f"\n{len(failures)} problem(s):")
        for f in failures:
            print(f"  {f}")
    if mismatches:
        print(f"\n*** {len(mismatches)} run(s) lost messages: see MISMATCH above ***")
    if args.json:
        doc = {
            "benchmark": "smtp-acceptance",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "machine": machine_info(),
            "postfix_version": postfix.version,
            "elemta_log_level": elemta.log_level,
            "repeat": repeat,
            "counts": {str(k): v for k, v in counts.items()},
            "cells": results,
            "problems": failures,
            "log_notes": notes,
            "table": table,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        log(f"results written to {args.json}")
    return 1 if failures else 0


def format_table(results: list[dict], level: str) -> str:
    head = (f"{'size':>6} {'sess':>4} {'reuse':>5} | {'postfix':>9} {'elemta':>9} {'ratio':>6} |"
            f" {'postfix':>8} {'elemta':>8} | {'other':>5}")
    m = machine_info()
    lines = [
        f"SMTP acceptance, median msgs/s and server CPU s per 1000 msgs (elemta log level {level})",
        f"machine: {m['cpus']} x {m['cpu_model'] or '?'}, {m['python']}, elemta {m['elemta_git']}",
        f"{'':>17} | {'msgs/s':^26} | {'CPU s/1000 msgs':^17} | {'':>5}",
        head,
        "-" * len(head),
    ]
    for c in results:
        ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        runs = c["postfix"] + c["elemta"]
        bad = "" if all(r["ok"] for r in runs) else "  (!)"
        cpus = os.cpu_count() or 1
        other = max((r["other_cpu_s"] / (r["wall_s"] * cpus) for r in runs if r["wall_s"]), default=0)
        lines.append(
            f"{fmt_size(c['size']):>6} {c['sessions']:>4} {'-d' if c['reuse'] else 'no':>5} |"
            f" {c['postfix_msgs_per_s']:>9.1f} {c['elemta_msgs_per_s']:>9.1f} {ratio:>6} |"
            f" {c['postfix_cpu_per_1000']:>8.2f} {c['elemta_cpu_per_1000']:>8.2f} | {other:>4.0%}{bad}"
        )
    lines.append("other: the most CPU, in % of all CPUs, that neither the server nor smtp-source used in a")
    lines.append("run of the cell (other processes, kernel work outside process context); (!): a run failed")
    return "\n".join(lines)


def machine_info() -> dict:
    try:
        rev = subprocess.run(["git", "-C", CHECKOUT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", CHECKOUT, "status", "--porcelain"],
                               capture_output=True, text=True).stdout.strip() != ""
    except OSError:
        rev, dirty = "", False
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": subprocess.run(["/usr/bin/python3", "--version"], capture_output=True,
                                 text=True).stdout.strip(),
        "elemta_git": rev + ("+dirty" if dirty else ""),
    }


# ---- idle-connection mode ------------------------------------------------------------------


def read_reply(sock: socket.socket) -> bytes:
    """One SMTP reply (all its lines)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        # complete when the last full line has a space after the code
        full = lines[:-1]
        if full and len(full[-1]) >= 4 and full[-1][3:4] == b" ":
            return data


def idle(args) -> int:
    n = args.idle
    want = n + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
        except (ValueError, OSError) as exc:
            log(f"cannot raise RLIMIT_NOFILE to {want} (now {soft}/{hard}): {exc}")
            return 1
    elemta = Elemta(log_level=args.log_level, max_connections=n + 100)
    socks: list[socket.socket] = []
    problems: list[str] = []
    result: dict = {"connections": n}
    try:
        elemta.start()
        pid = elemta.pid
        # One real transaction first, so lazily imported code and the queue are in memory.
        r = smtp_source(elemta.port, 10, 5120, 1, True, 60) if shutil.which("smtp-source") else None
        if r and (r["exit"] or r["stderr"]):
            problems.append(f"warm-up smtp-source exit {r['exit']}: {r['stderr'][:5]}")
        time.sleep(1)
        result["rss_before_kb"] = rss_kb(pid)
        result["pss_before_kb"] = pss_kb(pid)
        result["threads_before"] = tree_threads(pid)
        t0 = time.monotonic()
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", elemta.port), timeout=30)
            socks.append(s)
            banner = read_reply(s)
            if not banner.startswith(b"220"):
                problems.append(f"connection {i + 1}: banner {banner[:80]!r}")
                break
        result["open_seconds"] = round(time.monotonic() - t0, 2)
        time.sleep(2)
        result["rss_with_kb"] = rss_kb(pid)
        result["pss_with_kb"] = pss_kb(pid)
        result["threads_with"] = tree_threads(pid)
        result["fds_with"] = len(os.listdir(f"/proc/{pid}/fd"))
        result["opened"] = len(socks)
        # Are they all still served?  NOOP on each, expect 250.
        ok = 0
        for s in socks:
            try:
                s.sendall(b"NOOP\r\n")
                if read_reply(s).startswith(b"250"):
                    ok += 1
            except OSError:
                pass
        result["noop_ok"] = ok
        if ok != len(socks):
            problems.append(f"only {ok} of {len(socks)} idle connections answered NOOP with 250")
        for s in socks:
            try:
                s.sendall(b"QUIT\r\n")
            except OSError:
                pass
        for s in socks:
            s.close()
        socks = []
        time.sleep(2)
        result["rss_after_close_kb"] = rss_kb(pid)
        result["threads_after_close"] = tree_threads(pid)
    except (BenchError, OSError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        for s in socks:
            s.close()
        if elemta.proc is not None:
            problems += elemta.stop()
        problems += elemta.log_notes()
    result["problems"] = problems
    if "rss_with_kb" in result:
        delta = result["rss_with_kb"] - result["rss_before_kb"]
        result["rss_per_connection_kb"] = round(delta / max(1, result["opened"]), 1)
        print(f"elemta process tree PSS: {result['pss_before_kb'] / 1024:.1f} MiB idle, "
              f"{result['pss_with_kb'] / 1024:.1f} MiB with {result['opened']} idle connections")
        print(f"elemta process tree RSS: {result['rss_before_kb'] / 1024:.1f} MiB idle, "
              f"{result['rss_with_kb'] / 1024:.1f} MiB with {result['opened']} idle connections "
              f"(+{delta / 1024:.1f} MiB, {result['rss_per_connection_kb']} KiB each); "
              f"threads {result['threads_before']} -> {result['threads_with']}; "
              f"opened in {result['open_seconds']} s; {result['noop_ok']} answered NOOP; "
              f"RSS {result['rss_after_close_kb'] / 1024:.1f} MiB after closing them")
    for p in problems:
        print(f"  problem: {p}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "idle-connections", "machine": machine_info(), **result}, f, indent=2)
    return 1 if problems or result.get("opened") != n else 0


# ---- main ----------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, one repetition: a check that it all works")
    p.add_argument("--count", type=int, metavar="N", help="messages per run in every cell "
                   "(default 2000 for 5 KB, 500 for 100 KB; --quick 300/100)")
    p.add_argument("--count-large", type=int, metavar="N", help="messages per run for sizes over 10 KB")
    p.add_argument("--repeat", type=int, metavar="R", help="runs per system per cell (default 3; --quick 1)")
    p.add_argument("--sizes", type=int_list, default=SIZES, metavar="B,B", help="message sizes in bytes (-l)")
    p.add_argument("--sessions", type=int_list, default=SESSIONS, metavar="S,S", help="parallel sessions (-s)")
    p.add_argument("--reuse", choices=("both", "no", "yes"), default="both",
                   help="one message per connection (no), -d connection reuse (yes), or both")
    p.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default="auto", metavar="N",
                   help="elemta's server.workers (processes sharing the port; default auto, elemta's own)")
    p.add_argument("--log-level", choices=("info", "warning"), default="info",
                   help="elemta's log.level: info (its default, like Postfix, logs every message) or warning")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--postfix-port", type=int, metavar="PORT", help="Postfix's bench port (default: a free one)")
    p.add_argument("--budget", type=float, default=45, metavar="MIN",
                   help="no new cell starts after this many minutes (default 45)")
    p.add_argument("--max-other", type=float, default=0.25, metavar="F",
                   help="run again if more than this share of the CPUs went to other work (default 0.25)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="how many times a run disturbed by other work is done again (default 2)")
    p.add_argument("--idle", type=int, metavar="N",
                   help="instead: open N idle connections to elemta and report its RSS (target 2000)")
    args = p.parse_args(argv)
    if os.geteuid() != 0 and not args.idle:
        p.error("run as root: Postfix is configured, started and stopped")
    if not os.access(ELEMTA, os.X_OK):
        p.error(f"{ELEMTA} is missing or not executable")
    # SIGTERM to this script cleans up like Ctrl-C.
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if args.idle:
        return idle(args)
    return throughput(args)


if __name__ == "__main__":
    sys.exit(main())
