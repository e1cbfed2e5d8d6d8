"""`elemtactl`: look at and change elemta's queue, check and show its configuration, and manage
the users of SMTP AUTH.

It opens the daemon's SQLite queue itself (queue.admin), so it works whether or not the daemon
runs; users are lines of the password file (passwords.py), which the daemon re-reads when it
changes. Data goes to stdout (a table on a terminal, tab-separated lines in a pipe, or --json);
every error is one line on stderr and a sysexits(3) exit status (docs/elemtactl.md).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from elemta import __version__
from elemta import config as cfg
from elemta.cli import audit, ctlbase, tomlconf
from elemta.cli.ctl_plugins import dkim, plugins
from elemta.cli.ctl_queue_check import check as queue_check
from elemta.cli.ctl_route import route_group
from elemta.cli.ctl_status import reload, status
from elemta.cli.ctl_user import user_group
from elemta.cli.ctlbase import (
    EX_CONFIG,
    EX_NOINPUT,
    QUEUE_ID,
    Ctl,
    CtlError,
    DurationType,
    Root,
    _usage_error,
    json_option,
    pass_ctl,
)
from elemta.cli.render import Output
from elemta.errors import ConfigError
from elemta.queue import ids
from elemta.queue.admin import (
    ALL,
    Change,
    Filters,
)
from elemta.queue.model import PRIORITIES, STATES


@click.group(name="elemtactl", cls=Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", envvar="ELEMTA_CONFIG", show_envvar=True,
              help=f"Configuration file, as given to elemta (default {cfg.DEFAULT_PATH}).")
@click.option("--dev", is_flag=True,
              help="The queue of `elemta --dev` started in this directory (./dev-spool unless --config).")
@click.version_option(__version__, "-V", "--version", prog_name="elemtactl", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, dev: bool) -> None:
    """Look at and change elemta's mail queue; check and show its configuration;
    manage the users of SMTP AUTH; show the plugins' statistics; make DKIM keys;
    explain how mail for a domain is routed.

    Exit status: 0 done, 64 usage, 65 bad user name or password, 66 no such message,
    67 no such user, 69 queue (or password file) unavailable, 73 user exists or password
    file not writable, 75 queue locked, 77 permission denied, 78 bad configuration.
    """
    ctl = Ctl(config_path, dev)
    ctx.obj = ctl
    ctx.call_on_close(ctl.close)


@main.group()
def queue() -> None:
    """List, inspect and change the queued mail."""


@queue.command("list")
@click.option("--state", type=click.Choice(STATES), help="Messages with a recipient in this state.")
@click.option("--domain", metavar="DOMAIN", help="Messages with a pending recipient at this domain.")
@click.option("--sender", metavar="ADDRESS", help="Sender address, @domain, or <> for bounces.")
@click.option("--recipient", metavar="ADDRESS", help="Messages with this pending recipient.")
@click.option("--older-than", type=DurationType(), metavar="DURATION", help="Received longer ago (90s, 30m, 2h, 1d).")
@click.option("--priority", type=click.Choice(PRIORITIES), help="Messages of this priority.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="Messages per page; 0 = all.")
@click.option("--after", type=QUEUE_ID, metavar="ID", help="The page after this queue ID (see the last line).")
@json_option
@pass_ctl
def list_(ctl: Ctl, state, domain, sender, recipient, older_than, priority, limit, after, as_json) -> None:
    """List messages, oldest first.

    Without --state: messages with a recipient still to deliver. Filters combine; recipient
    filters (--domain, --recipient) look at recipients not yet final, or in --state.
    """
    filters = Filters(state=state, domain=domain, sender=sender, recipient=recipient,
                      older_than=older_than, priority=priority)
    page = ctl.admin.list(filters, limit=limit, after=after)
    filtered = filters != Filters() or after is not None
    Output(as_json).page(page, time.time(), "No messages match." if filtered else "The queue is empty.")


@queue.command()
@click.argument("queue_id", type=QUEUE_ID, metavar="ID")
@click.option("--body", is_flag=True, help="Print the stored message itself, as received (like postcat).")
@json_option
@pass_ctl
def show(ctl: Ctl, queue_id: str, body: bool, as_json: bool) -> None:
    """Show a message: envelope, header fields, recipients."""
    if body:
        if as_json:
            raise _usage_error("--body prints the raw message; it has no JSON form")
        data = ctl.admin.body(queue_id)
        if data is None:
            raise CtlError(f"{queue_id}: the body was dropped when its last recipient was delivered or failed",
                           EX_NOINPUT)
        # sys.stdout.buffer, not click.get_binary_stream (deprecated since click 8.5): the
        # same stream, and CliRunner replaces it as well.
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    Output(as_json).detail(ctl.admin.show(queue_id), time.time())


@queue.command()
@click.argument("queue_id", type=QUEUE_ID, metavar="ID")
@json_option
@pass_ctl
def trace(ctl: Ctl, queue_id: str, as_json: bool) -> None:
    """Show every delivery attempt, and the next retry."""
    Output(as_json).trace(ctl.admin.trace(queue_id), time.time())


def _targets(words: tuple[str, ...], allow_all: bool, yes: bool, what: str, path: str) -> list[str] | str:
    """IDs from the command line and, for '-', from stdin (one per line; the first field, so
    `elemtactl queue list | elemtactl queue hold -` works); or ALL, confirmed."""
    if "ALL" in words:
        if not allow_all:
            raise _usage_error("ALL is not allowed here (queue flush makes everything due)")
        if len(words) > 1:
            raise _usage_error("ALL stands alone: give ALL or queue IDs, not both")
        if not yes:
            if not ctlbase._interactive():
                raise _usage_error(f"ALL would {what} every message: add --yes")
            if not click.confirm(f"{what.capitalize()} every message in {path}?", default=False, err=True):
                raise _usage_error(f"not confirmed: nothing to {what}")
        return ALL
    found: list[str] = []
    for word in words:
        if word == "-":
            for line in sys.stdin:  # click.get_text_stream is deprecated since click 8.5
                fields = line.split()
                if fields and not fields[0].startswith("#"):
                    found.append(fields[0])
        else:
            found.append(word)
    checked = []
    for word in found:
        if not ids.is_valid(word.upper()):
            hint = " (ALL, in upper case, means every message)" if word.lower() == "all" else ""
            raise _usage_error(f"{word!r} is not a queue ID{hint}")
        checked.append(word.upper())
    if not checked:
        raise _usage_error("no queue IDs given")
    return checked


def _report(change: Change, as_json: bool) -> None:
    Output(as_json).change(change)
    if change.not_found:
        shown = ", ".join(change.not_found[:10]) + (", ..." if len(change.not_found) > 10 else "")
        raise CtlError(f"no such message: {shown}", EX_NOINPUT)


def _changer(name: str, allow_all: bool, doc: str, what: str) -> click.Command:
    """`queue hold|release|requeue|delete ID...`: the same command line, a different change."""

    def command(ctl: Ctl, words: tuple[str, ...], as_json: bool, yes: bool = False) -> None:
        targets = _targets(words, allow_all, yes, what, ctl.config.queue_path)
        change = getattr(ctl.admin, name)(targets)
        audit.log_change(ctl.config, change, None if targets == ALL else list(targets))
        _report(change, as_json)

    command.__doc__ = doc
    decorators = [
        queue.command(name),
        click.argument("words", nargs=-1, required=True, metavar="ID... | -" + (" | ALL" if allow_all else "")),
        json_option,
    ]
    if allow_all:
        decorators.append(click.option("--yes", "-y", is_flag=True, help="Change ALL without asking."))
    decorators.append(pass_ctl)
    decorated: Any = command  # each decorator changes what it is; click.Command at the end
    for decorate in reversed(decorators):
        decorated = decorate(decorated)
    assert isinstance(decorated, click.Command)
    return decorated


_changer("hold", True, "Hold messages until released.\n\nTheir queued and deferred recipients are held;"
         " recipients being delivered are left alone and reported.", "hold")
_changer("release", True, "Release held messages.\n\nHeld recipients become due now.", "release")
_changer("requeue", False, "Retry deferred recipients now.\n\nTheir attempts so far still count.", "requeue")
_changer("delete", True, "Delete messages, without a bounce.\n\nA message with a recipient being delivered"
         " is left alone and reported.", "delete")


@queue.command()
@click.argument("domain", required=False)
@json_option
@pass_ctl
def flush(ctl: Ctl, domain: str | None, as_json: bool) -> None:
    """Make everything (or DOMAIN's mail) due now.

    Every queued and deferred recipient (of that recipient domain) is tried at once.
    """
    change = ctl.admin.flush(domain)
    audit.log_change(ctl.config, change, None, **({"domain": domain} if domain else {}))
    _report(change, as_json)


@queue.command()
@click.argument("queue_id", type=QUEUE_ID, metavar="ID")
@click.argument("level", type=click.Choice(PRIORITIES, case_sensitive=False), metavar="LEVEL")
@json_option
@pass_ctl
def priority(ctl: Ctl, queue_id: str, level: str, as_json: bool) -> None:
    """Set a message's priority (critical, high, normal, low)."""
    change = ctl.admin.set_priority(queue_id, level.lower())
    audit.log_change(ctl.config, change, [queue_id], priority=level.lower())
    _report(change, as_json)


@queue.command()
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Domains shown, most recipients first; 0 = all.")
@json_option
@pass_ctl
def stats(ctl: Ctl, top: int, as_json: bool) -> None:
    """Show counts by state, priority, domain and age.

    Recipients by state, messages by priority, and recipients still to deliver by domain and
    message age in minutes, like Postfix's qshape.
    """
    Output(as_json).stats(ctl.admin.stats(), top)


@main.group("config")
def config_group() -> None:
    """Check or show the configuration."""


@config_group.command()
@json_option
@pass_ctl
def check(ctl: Ctl, as_json: bool) -> None:
    """Check the configuration as the daemon does (exit 78 if bad).

    Every problem found is reported, one line each (with --json, as the list "problems").
    """
    from elemta.assemble import check_startup  # imported late: it loads the delivery code

    try:
        config = ctl.config
        check_startup(config)
    except ConfigError as exc:
        if as_json:  # a script gets the verdict on stdout, whatever it was
            problems = list(exc.problems) or [str(exc)]
            Output(True).json({"valid": False, "file": ctl.config_path or cfg.DEFAULT_PATH,
                               "problems": problems})
            raise SystemExit(EX_CONFIG) from None
        # One line per problem, as `elemta --check-config`: CtlError would join them into one.
        for problem in exc.problems[:-1]:
            click.echo(f"elemtactl: {problem}", err=True)
        raise CtlError(exc.problems[-1] if exc.problems else str(exc), EX_CONFIG) from None
    source = config.source or cfg.DEFAULT_PATH
    if as_json:
        Output(True).json({"valid": True, "file": source})
    else:
        click.echo(f"OK: {source}")


@config_group.command("show")
@json_option
@pass_ctl
def config_show(ctl: Ctl, as_json: bool) -> None:
    """Print the configuration in effect, with every default, as TOML."""
    if as_json:
        Output(True).json(tomlconf.as_dict(ctl.config))
    else:
        click.echo(tomlconf.dumps(ctl.config), nl=False)


queue.add_command(queue_check)
main.add_command(user_group)
main.add_command(plugins)
main.add_command(status)
main.add_command(reload)
main.add_command(dkim)
main.add_command(route_group)


if __name__ == "__main__":
    sys.exit(main(prog_name="elemtactl"))  # not "python -m ...", in usage and error lines
