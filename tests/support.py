"""Test helpers shared by the suites: waiting on conditions, the real daemon, a raw SMTP client."""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ELEMTA = ROOT / "bin" / "elemta"


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll predicate until it returns something true; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Clock:
    """A fake clock for code that takes a `now` callable: tests move time instead of sleeping."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def cli_runner():
    """click's CliRunner with stdout and stderr apart (result.stdout, result.stderr): click 8.1
    mixes them unless given mix_stderr=False, and 8.2 removed that argument (always apart)."""
    from click.testing import CliRunner  # here: most suites never need click

    if "mix_stderr" in inspect.signature(CliRunner).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


# ---- running elemta as user nobody (root's tests of "permission denied") ----

SETPRIV_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


@functools.cache
def readable_copy() -> Path:
    """elemta/ and bin/ copied into a fresh directory under /tmp that every user may read
    (directories and launchers 0755, files 0644), made once per test session and removed when
    it ends.  The checkout itself may lie where nobody cannot enter: a root user's clone in
    /root (mode 0700) is the common case on a fresh server."""
    top = Path(tempfile.mkdtemp(prefix="elemta-readable-", dir="/tmp"))
    atexit.register(shutil.rmtree, top, True)
    for name in ("elemta", "bin"):
        shutil.copytree(ROOT / name, top / name, copy_function=shutil.copyfile,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for path in (top, *top.rglob("*")):
        executable = path.is_dir() or path.parent == top / "bin"
        os.chmod(path, 0o755 if executable else 0o644)
    return top


@functools.cache
def _nobody_may_run_this_python() -> bool:
    """Whether nobody can run sys.executable with its packages: not a virtualenv under /root.
    Asked through sh, as the launchers run it; the same sys.prefix, since a virtualenv's python
    whose pyvenv.cfg it cannot read runs as the base interpreter, with other packages."""
    script = "import sys, elemta.cli.elemtactl; print(sys.prefix)"
    probe = subprocess.run([*SETPRIV_NOBODY, "/bin/sh", "-c", 'exec "$0" -c "$1"', sys.executable, script],
                           env={**os.environ, "PYTHONPATH": str(readable_copy())}, cwd="/",
                           capture_output=True, text=True, timeout=60, check=False)
    return probe.returncode == 0 and probe.stdout.strip() == sys.prefix


def as_nobody(command: list[str]) -> tuple[list[str], dict[str, str]]:
    """`command` run as user nobody (setpriv, as root) on readable_copy(): a program of the
    checkout (bin/elemtactl) becomes the copy's, and PYTHONPATH names the copy.  Returns the
    command and its environment.  Python, there and in the launchers, is sys.executable when
    nobody may run it, else Debian's python3 (a virtualenv under /root is closed to nobody)."""
    args, env = from_readable_copy(command)
    return [*SETPRIV_NOBODY, *args], env


def from_readable_copy(command: list[str]) -> tuple[list[str], dict[str, str]]:
    """`command` on readable_copy(), as as_nobody() but run by the caller's own user: for a
    daemon started as root that becomes another user, and must still import what it loads late."""
    python = sys.executable if _nobody_may_run_this_python() else "/usr/bin/python3"
    env = {**os.environ, "PYTHONPATH": str(readable_copy()), "ELEMTA_PYTHON": python}
    inside = str(ROOT) + os.sep
    args = [str(readable_copy() / arg[len(inside):]) if arg.startswith(inside)
            else python if arg == sys.executable else arg for arg in command]
    return args, env


def as_root(config: str) -> str:
    """The config with server.user = "root" when the tests run as root, unless it names a user:
    the suite's spools lie under pytest's 0700 temp directory, which no other user can enter.
    The privilege drop has tests of its own (tests/test_privileges.py)."""
    if os.geteuid() != 0 or re.search(r"(?m)^user\s*=", config):
        return config
    if re.search(r"(?m)^\[server\]\s*$", config):
        return re.sub(r"(?m)^\[server\]\s*$", '[server]\nuser = "root"', config, count=1)
    return config + '\n[server]\nuser = "root"\n'


class Daemon:
    """The real `elemta` launcher as a subprocess, on ports it picks itself (port 0)."""

    LISTENING = re.compile(r"^elemta: listening on \[?([0-9a-f.:]+)\]?:(\d+) \((\w+)\)$")

    def __init__(self, workdir: Path, config: str, args: tuple[str, ...] = (), *, wrap=None,
                 env: dict[str, str] | None = None):
        """wrap(command) -> (command, environment) changes how it is run (as_nobody,
        from_readable_copy); env adds to the environment.  A config that names server.user
        is run as written (see as_root)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spool = self.workdir / "spool"
        self.config_path = self.workdir / "elemta.toml"
        if not re.search(r"(?m)^\[monitor\]", config):
            # The default endpoint is a fixed port (127.0.0.1:9525): tests that want the
            # endpoint say [monitor] with port 0; the rest run without it.
            config += '\n[monitor]\nlisten = ""\n'
        self.config_path.write_text(
            as_root(config.replace("@SPOOL@", str(self.spool))), encoding="utf-8"
        )
        self.args = args
        self.wrap = wrap
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ports: dict[str, int] = {}  # role -> port (the last listener of that role)
        self.addresses: list[tuple[str, int, str]] = []

    def start(self, timeout: float = 15.0, preexec_fn=None) -> Daemon:
        self.stdout.clear()
        self.stderr.clear()  # each start has its own log
        self.addresses.clear()
        command, env = [str(ELEMTA), "--config", str(self.config_path), *self.args], dict(os.environ)
        if self.wrap is not None:
            command, env = self.wrap(command)
        self.proc = subprocess.Popen(
            command, env={**env, **self.env}, preexec_fn=preexec_fn,
            cwd=self.workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        # Up when every listener is announced on stdout (a supervisor announces once all
        # its workers listen) and the log says started.
        expected = max(1, self.config_path.read_text().count("[[listeners]]"))

        def up() -> bool:
            announced = sum(1 for line in self.stdout if self.LISTENING.match(line))
            # " started ": an SMTP process's line, not the delivery process's delivery_started.
            return announced >= expected and re.search(r' started |"event": "started"', self.log_text())

        wait_for(lambda: up() or self.proc.poll() is not None, timeout, what="daemon start")
        if self.proc.poll() is not None:
            raise AssertionError(f"elemta exited {self.proc.returncode}: {self.log_text()}")
        for line in list(self.stdout):
            match = self.LISTENING.match(line)
            if match:
                host, port, role = match.group(1), int(match.group(2)), match.group(3)
                self.addresses.append((host, port, role))
                self.ports[role] = port
        return self

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def log_text(self) -> str:
        """Standard error, or the log file when the config says log.target = "file"."""
        match = re.search(r'(?m)^file = "(/[^"]+)"', self.config_path.read_text())
        if match and re.search(r'(?m)^target = "file"', self.config_path.read_text()):
            try:
                return "\n".join(self.stderr) + Path(match.group(1)).read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(self.stderr)

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stuck = _process_tree(self.proc.pid)
            for pid in stuck:  # leave nothing running; then say what would not stop
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)
            tail = "\n".join(self.log_text().splitlines()[-40:])
            raise AssertionError(f"the daemon did not stop within {timeout} s after SIGTERM; "
                                 f"still running: {stuck}\n{tail}") from None
        finally:
            self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would stop it."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        for reader in self._readers:
            reader.join(5)

    # ---- reading the queue back, as an admin would, straight from SQLite ----

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.spool / 'queue.db'}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def messages(self) -> list[sqlite3.Row]:
        with self.db() as conn:
            return conn.execute("SELECT * FROM messages ORDER BY queue_id").fetchall()

    def body(self, queue_id: str) -> bytes:
        with self.db() as conn:
            row = conn.execute("SELECT data FROM bodies WHERE queue_id = ?", (queue_id,)).fetchone()
        return bytes(row[0])

    def recipients(self, queue_id: str) -> list[sqlite3.Row]:
        with self.db() as conn:
            return conn.execute(
                "SELECT * FROM recipients WHERE queue_id = ? ORDER BY id", (queue_id,)
            ).fetchall()


class RawClient:
    """A deliberately dumb SMTP client: sends exactly the bytes given, reads whole replies."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, read_greeting: bool = True):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self._buf = b""
        self.greeting = self.reply() if read_greeting else None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One whole reply (multi-line joined with \\n) as (code, text)."""
        lines = []
        while True:
            while b"\r\n" not in self._buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed by server after {lines!r}")
                self._buf += chunk
            line, self._buf = self._buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), "\n".join(ln[4:] for ln in lines)

    def cmd(self, data: bytes | str) -> tuple[int, str]:
        if isinstance(data, str):
            data = data.encode()
        self.send(data if data.endswith(b"\n") else data + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (recv gives EOF or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/task/{current}/children", encoding="ascii") as handle:
                todo += [int(child) for child in handle.read().split()]
        except OSError:
            continue
        found.append(current)
    return found
