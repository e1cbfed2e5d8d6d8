"""`elemtactl queue check`: is the queue database sound?  The daemon's start-up check
(queue/integrity.py) without its time limit, and with the full integrity check on request;
safe while the daemon runs (a read transaction)."""

from __future__ import annotations

import json
import sqlite3

import click

from elemta.cli.ctlbase import EX_DATAERR, EX_UNAVAILABLE, Ctl, CtlError, json_option, pass_ctl
from elemta.queue import db, integrity


@click.command("check")
@click.option("--full", is_flag=True,
              help="PRAGMA integrity_check: also indexes against their tables (slower).")
@json_option
@pass_ctl
def check(ctl: Ctl, full: bool, as_json: bool) -> None:
    """Check the queue database for damage (exit status 65 when damaged).

    Runs SQLite's quick check (or, with --full, its integrity check) and the foreign keys, and
    counts messages whose text is missing.  See elemta(8), RECOVERY, for what to do then.
    """
    path = ctl.config.queue_path
    try:
        integrity.check_presence(path)
    except integrity.DamagedQueue as exc:
        _finish([str(exc)], {}, as_json)
    try:
        conn = db.connect(path, create=False, readonly=True)
    except sqlite3.Error as exc:
        raise CtlError(f"{path}: cannot open the queue: {exc}", EX_UNAVAILABLE) from None
    try:
        # Without a time limit the check always finishes (None would mean it did not).
        problems = integrity.quick_check(conn, seconds=float("inf"), full=full) or []
        counts: dict[str, int] = {}
        if not problems:
            try:
                problems += [f"foreign key: {row[0]} row {row[1]} refers to a missing {row[2]}"
                             for row in conn.execute("PRAGMA foreign_key_check").fetchmany(10)]
                counts["messages"] = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
                counts["without_text"] = conn.execute(
                    "SELECT count(*) FROM messages m WHERE m.done_at IS NULL"
                    " AND NOT EXISTS (SELECT 1 FROM bodies b WHERE b.queue_id = m.queue_id)").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                problems.append(str(exc))
            if counts.get("without_text"):
                problems.append(f"{counts['without_text']} undelivered message(s) have lost their text")
    finally:
        conn.close()
    _finish(problems or [], counts, as_json)


def _finish(problems: list[str], counts: dict[str, int], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, **counts}))
    elif problems:
        for problem in problems:
            click.echo(f"damaged: {problem}")
    else:
        click.echo(f"ok: {counts.get('messages', 0)} messages, no damage found")
    if problems:
        raise click.exceptions.Exit(EX_DATAERR)
