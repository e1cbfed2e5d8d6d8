"""An admin's changes to the queue, logged where the daemon logs ([log] target), with the
admin's user: `elemtactl[PID]: <queue ID> admin_hold user=alice`, one line per message named,
so one grep of a queue ID shows who held or released it as well as what the daemon did.

With target "file" the line is appended to log.file; with "syslog" it goes to /dev/log with
the daemon's facility; with "stderr" (the daemon's standard error, under systemd the journal)
it goes to /dev/log too, which under systemd is the journal. If it cannot be written, the
change still stands and one warning says why it was not logged.
"""

from __future__ import annotations

import os
import pwd

import click

from elemta import log as logmod
from elemta.config import Config
from elemta.queue.admin import Change

MAX_LINES = 1000  # messages named one by one; past it one line counts the rest


def admin_user() -> str:
    """Who ran elemtactl: the sudo caller if root came through sudo, else the real user."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo}(sudo)" if uid == 0 and sudo else name


def log_change(config: Config, change: Change, ids: list[str] | None, **fields) -> None:
    """Log what change did. ids: the queue IDs given (None for ALL or a flush)."""
    try:
        target = _target(config)
    except OSError as exc:
        click.echo(f"elemtactl: warning: the change was made but not logged: {exc}", err=True)
        return
    if target is None:
        return
    events = logmod.EventLog("info", config.log.format == "json", target=target)
    user = admin_user()
    event = f"admin_{change.action}"
    if ids is None:
        events(event, user=user, messages=change.messages, recipients=change.recipients, **fields)
        return
    left_alone = set(change.not_found) | set(change.skipped)
    changed = [qid for qid in ids if qid not in left_alone]
    for qid in changed[:MAX_LINES]:
        events(event, qid=qid, user=user, **fields)
    if len(changed) > MAX_LINES:
        events(event, user=user, more=len(changed) - MAX_LINES, **fields)
    for qid in change.skipped[:MAX_LINES]:
        events(event, qid=qid, user=user, skipped="being delivered", **fields)


def _target(config: Config) -> logmod.Target | None:
    if config.log.target == "file":
        return logmod.FileTarget(config.log.file, ident="elemtactl")
    facility = config.log.facility if config.log.target == "syslog" else "mail"
    if config.log.target == "stderr" and not os.path.exists(logmod.SYSLOG_PATH):
        return None  # a daemon on a terminal (dev mode): no shared log to write to
    return logmod.SyslogTarget(facility, ident="elemtactl")
