"""`elemtactl status` (is the daemon up and ready, and how is it) and `elemtactl reload`.

What they read is what the daemon leaves in its spool: the PID file and its lock (pidfile.py),
status.json (monitor.py: the processes and their roles, the listeners, the monitor's
addresses), the plugins' statistics files, and the queue itself. Readiness is asked of the
daemon's own /readyz; with no monitor endpoint elemtactl runs the same checks itself.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import click

from elemta import monitor
from elemta.cli.ctlbase import (
    EX_NOPERM,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    Ctl,
    CtlError,
    json_option,
    pass_ctl,
)
from elemta.cli.render import Output, human_duration, local_time
from elemta.errors import QueueError
from elemta.pidfile import NAME as PID_FILE
from elemta.pidfile import read_pid
from elemta.plugins import statsfile

READYZ_TIMEOUT = 5.0


@click.command("status")
@json_option
@pass_ctl
def status(ctl: Ctl, as_json: bool) -> None:
    """Is elemta running and ready to take mail; its processes, listeners, queue and plugins.

    Exit status 0 when running and ready, 75 when running but not ready (the problems are
    listed), 69 when not running.
    """
    config = ctl.config
    report = gather(ctl)
    if as_json:
        Output(True).json(report)
    else:
        _print(report, config.server.spool_dir)
    if not report["running"]:
        raise SystemExit(EX_UNAVAILABLE)
    if not report["ready"]:
        raise SystemExit(EX_TEMPFAIL)


def gather(ctl: Ctl) -> dict:
    config = ctl.config
    spool = config.server.spool_dir
    pid = daemon_pid(spool)
    report: dict = {"running": pid is not None, "pid": pid, "spool": spool}
    if pid is None:
        report["ready"] = False
        report["problems"] = [f"no elemta holds the PID file {os.path.join(spool, 'elemta.pid')}"]
        return report
    state = monitor.read_status(config)
    if state is not None and state.get("pid") != pid:
        state = None  # left by an earlier run
    if state is not None:
        report.update(
            version=state["version"], started=state["started"],
            uptime_seconds=round(time.time() - state["started"]),
            listeners=state["listeners"], monitor=state["monitor"],
            processes=[{**child, "alive": monitor.alive(child["pid"])} for child in state["children"]],
        )
    report["queue"] = _queue(ctl)
    loaded, _ = statsfile.read_all(spool)
    report["plugins"] = [{"name": p["name"], "health": p.get("health", "ok"),
                          "last_error": p.get("last_error", "")} for p in loaded]
    ready, answer = _readiness(config, state)
    report["ready"] = ready
    report["problems"] = answer.get("problems", [])
    return report


def daemon_pid(spool: str) -> int | None:
    """The running daemon's PID; CtlError (77) when this user may not tell, rather than a
    wrong "not running"."""
    path = os.path.join(spool, PID_FILE)
    try:
        os.stat(path)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise CtlError(f"cannot look into {spool}: permission denied (run as root or as elemta's user)",
                       EX_NOPERM) from None
    if not os.access(path, os.R_OK):
        raise CtlError(f"cannot read {path}: permission denied (run as root or as elemta's user)", EX_NOPERM)
    return read_pid(spool)


def _queue(ctl: Ctl) -> dict:
    try:
        stats = ctl.admin.stats()
    except QueueError as exc:
        return {"error": str(exc)}
    return {"messages": stats.messages, "bytes": stats.bytes, "oldest_age": stats.oldest_age,
            "recipients_by_state": stats.recipients_by_state}


def _readiness(config, state: dict | None) -> tuple[bool, dict]:
    """The daemon's /readyz, else the same checks run here."""
    for address in (state or {}).get("monitor", []):
        host, port = monitor.split_host_port(address)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        shown = f"[{host}]" if ":" in host else host
        try:
            with urllib.request.urlopen(f"http://{shown}:{port}/readyz", timeout=READYZ_TIMEOUT) as answer:
                return True, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                return False, json.loads(exc.read())
        except (OSError, ValueError):
            continue
    return monitor.Health(config, lambda: state).ready()


def _print(report: dict, spool: str) -> None:
    out = Output(False)
    if not report["running"]:
        out.note(f"elemta is not running on {spool}.")
        return
    since = report.get("started")
    click.echo(f"elemta {report.get('version', '?')}: running, {'ready' if report['ready'] else 'NOT READY'}")
    uptime = report.get("uptime_seconds")
    up = f", up {human_duration(uptime)} (since {local_time(since)})" if since and uptime is not None else ""
    click.echo(f"  PID {report['pid']}{up}")
    for listener in report.get("listeners", []):
        click.echo(f"  listening on {listener['address']} ({listener['role']})")
    processes = report.get("processes", [])
    if processes:
        shown = ", ".join(f"{p['role']} {p['pid']}" + ("" if p["alive"] else " (not running)") for p in processes)
        click.echo(f"  processes: {shown}")
    for address in report.get("monitor", []):
        click.echo(f"  monitor: http://{address}/")
    queue = report["queue"]
    if "error" in queue:
        click.echo(f"  queue: cannot be read: {queue['error']}")
    else:
        states = ", ".join(f"{k} {v}" for k, v in queue["recipients_by_state"].items() if v)
        oldest = f", oldest {human_duration(queue['oldest_age'])}" if queue["oldest_age"] is not None else ""
        click.echo(f"  queue: {queue['messages']} messages, {queue['bytes']} bytes{oldest}"
                   + (f"; recipients: {states}" if states else ""))
    for plugin in report.get("plugins", []):
        error = f" ({plugin['last_error']})" if plugin["health"] != "ok" and plugin["last_error"] else ""
        click.echo(f"  plugin {plugin['name']}: {plugin['health']}{error}")
    for problem in report["problems"]:
        click.echo(f"  problem: {problem}")


@click.command("reload")
@pass_ctl
def reload(ctl: Ctl) -> None:
    """Make the running elemta read its configuration again (SIGHUP to the PID in its PID file).

    Check the file first with `elemtactl config check`: a bad file is logged and ignored by the
    daemon, which keeps the configuration it has.
    """
    spool = ctl.config.server.spool_dir
    pid = daemon_pid(spool)
    if pid is None:
        raise CtlError(f"elemta is not running on {spool} (nothing to reload)", EX_UNAVAILABLE)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise CtlError(f"not allowed to signal elemta (PID {pid}): run as root or as its user", EX_NOPERM) from None
    except ProcessLookupError:
        raise CtlError(f"elemta (PID {pid}) has just stopped", EX_UNAVAILABLE) from None
    click.echo(f"reload requested: SIGHUP sent to elemta (PID {pid}); its log says reloaded or reload_failed")
