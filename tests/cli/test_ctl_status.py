"""`elemtactl status` and `elemtactl reload` against the real daemon, as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import Daemon, as_nobody, wait_for

ELEMTACTL = Path(__file__).resolve().parent.parent.parent / "bin" / "elemtactl"

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"
workers = 2

[smtp]
local_domains = ["example.com"]

[delivery]
hold = true

[queue]
min_free_space = 0

[monitor]
listen = "@MONITOR@"
"""


def ctl(daemon: Daemon, *args: str, wrap=None) -> subprocess.CompletedProcess:
    command = [str(ELEMTACTL), "--config", str(daemon.config_path), *args]
    env = None
    if wrap is not None:
        command, env = wrap(command)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.fixture(params=["127.0.0.1:0", ""], ids=["endpoint", "no-endpoint"])
def daemon(tmp_path, request):
    d = Daemon(tmp_path, CONFIG.replace("@MONITOR@", request.param)).start()
    yield d
    d.stop()


def test_a_running_ready_daemon(daemon):
    done = ctl(daemon, "status")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("elemta ") and ": running, ready\n" in done.stdout
    assert f"  PID {daemon.proc.pid}, up " in done.stdout
    assert f"listening on 127.0.0.1:{daemon.port} (mx)" in done.stdout
    report = json.loads(ctl(daemon, "status", "--json").stdout)
    assert (report["running"], report["ready"], report["pid"]) == (True, True, daemon.proc.pid)
    roles = sorted(p["role"] for p in report["processes"] if p["alive"])
    assert [r for r in roles if r != "monitor"] == ["delivery", "smtp", "smtp"]
    assert report["queue"]["messages"] == 0 and report["problems"] == []


def test_running_but_not_ready_is_75_with_the_problem(daemon):
    report = json.loads(ctl(daemon, "status", "--json").stdout)
    delivery = next(p["pid"] for p in report["processes"] if p["role"] == "delivery")
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # the supervisor cannot start a new one meanwhile
    try:
        os.kill(delivery, signal.SIGKILL)
        wait_for(lambda: ctl(daemon, "status").returncode == 75, 15, what="status to say not ready")
        done = ctl(daemon, "status")
        assert "running, NOT READY" in done.stdout
        assert f"problem: delivery process {delivery} is not running" in done.stdout
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    wait_for(lambda: ctl(daemon, "status").returncode == 0, 20, what="status to be ready again")


def test_a_stopped_daemon_is_69(daemon):
    daemon.stop()
    done = ctl(daemon, "status")
    assert done.returncode == 69 and "elemta is not running on" in done.stderr
    assert json.loads(ctl(daemon, "status", "--json").stdout)["running"] is False
    refused = ctl(daemon, "reload")
    assert refused.returncode == 69 and "nothing to reload" in refused.stderr


def test_reload_signals_the_daemon(daemon):
    done = ctl(daemon, "reload")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: " reloaded " in daemon.log_text(), 10, what="the daemon to reload")


def test_reload_by_someone_else_is_77(open_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to run elemtactl as nobody")
    daemon = Daemon(open_dir, CONFIG.replace("@MONITOR@", ""))
    os.chmod(daemon.config_path, 0o644)  # nobody may read it, not signal the daemon
    daemon.start()
    try:
        done = ctl(daemon, "reload", wrap=as_nobody)  # the spool is 0750: not "not running"
        assert done.returncode == 77 and "permission denied" in done.stderr, done.stderr
        os.chmod(daemon.spool, 0o755)
        done = ctl(daemon, "status", wrap=as_nobody)
        assert done.returncode == 77 and "cannot read" in done.stderr, done.stderr
        os.chmod(daemon.spool / "elemta.pid", 0o644)
        done = ctl(daemon, "reload", wrap=as_nobody)
        assert done.returncode == 77, done.stdout + done.stderr
        assert "not allowed to signal elemta" in done.stderr
    finally:
        daemon.stop()
