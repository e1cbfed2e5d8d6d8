"""`elemtactl`: look at and change elemta's queue, check and show its configuration, and manage
the users of SMTP AUTH.

It opens the daemon's SQLite queue itself (queue.admin), so it works whether or not the daemon
runs; users are lines of the password file (passwords.py), which the daemon re-reads when it
changes. Data goes to stdout (a table on a terminal, tab-separated lines in a pipe, or --json);
every error is one line on stderr and a sysexits(3) exit status (docs/elemtactl.md).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass

import click
from rich import box
from rich.table import Table

from elemta import __version__
from elemta import config as cfg
from elemta.cli import elemta as daemon_cli
from elemta.cli import tomlconf
from elemta.cli.render import Output
from elemta.errors import ConfigError, ElemtaError, QueueError
from elemta.passwords import (
    BadPassword,
    BadUserName,
    NoSuchUser,
    PasswordFile,
    PasswordFileUnavailable,
    PasswordFileWriteError,
    User,
    UserExists,
    normalize,
    password_problem,
    user_name_problem,
)
from elemta.queue import ids
from elemta.queue.admin import (
    ALL,
    Change,
    Filters,
    NoSuchMessage,
    QueueAdmin,
    QueueBusy,
    QueuePermissionError,
    QueueUnavailable,
)
from elemta.queue.model import PRIORITIES, STATES

# sysexits(3)
EX_USAGE = 64  # a bad command line: unknown option, bad duration or priority, ALL unconfirmed
EX_DATAERR = 65  # a user name or password that cannot be stored
EX_NOINPUT = 66  # no message with that ID (or its body is gone)
EX_NOUSER = 67  # no such user (user passwd, user delete)
EX_UNAVAILABLE = 69  # no queue database where the config says, or one this version cannot read
EX_CANTCREAT = 73  # user add of a user that exists; the password file cannot be written
EX_TEMPFAIL = 75  # the queue stayed locked too long
EX_NOPERM = 77  # not allowed to read (or change) the queue
EX_CONFIG = 78  # a bad configuration file


class CtlError(click.ClickException):
    """An error reported as one line on stderr, with its exit status."""

    def __init__(self, message: str, exit_code: int, prefix: str = "elemtactl") -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the cause said
        self.exit_code = exit_code
        self.prefix = prefix

    def show(self, file=None) -> None:
        click.echo(f"{self.prefix}: {self.format_message()}", err=True)


def _usage_error(message: str) -> click.UsageError:
    """A usage error found by a command itself, named after that command."""
    return click.UsageError(message, ctx=click.get_current_context(silent=True))


def _usage(exc: click.UsageError) -> CtlError:
    where = exc.ctx.command_path if exc.ctx is not None else "elemtactl"
    return CtlError(exc.format_message(), EX_USAGE, where)


# Errors of the layers below, and the exit status each gets.
_EXIT_CODES = (
    (NoSuchMessage, EX_NOINPUT),
    (QueuePermissionError, EX_NOPERM),
    (QueueBusy, EX_TEMPFAIL),
    (QueueUnavailable, EX_UNAVAILABLE),
    (ConfigError, EX_CONFIG),
    (QueueError, EX_UNAVAILABLE),
    (BadUserName, EX_DATAERR),
    (BadPassword, EX_DATAERR),
    (NoSuchUser, EX_NOUSER),
    (UserExists, EX_CANTCREAT),
    (PasswordFileWriteError, EX_CANTCREAT),
    (PasswordFileUnavailable, EX_UNAVAILABLE),
)


class Root(click.Group):
    """Usage errors exit 64 (click's own choice is 2) in one line; errors from the queue and
    the config get their sysexits status."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _usage(exc) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CtlError:
            raise
        except click.UsageError as exc:
            raise _usage(exc) from None
        except ElemtaError as exc:
            for kind, code in _EXIT_CODES:
                if isinstance(exc, kind):
                    text = f"no such message: {exc}" if kind is NoSuchMessage else str(exc)
                    if getattr(exc, "permission", False):  # the password file's errors
                        code = EX_NOPERM
                    raise CtlError(text, code) from None
            raise CtlError(str(exc), EX_UNAVAILABLE) from None


class Ctl:
    """What every command needs, built once: the configuration (read on first use, as the daemon
    reads it) and the queue (opened on first use)."""

    def __init__(self, config_path: str | None, dev: bool) -> None:
        self.config_path = config_path
        self.dev = dev
        self.auth_file: str | None = None  # `user --file`, else the config's smtp.auth_file
        self._config: cfg.Config | None = None
        self._admin: QueueAdmin | None = None
        self._passwords: PasswordFile | None = None

    @property
    def config(self) -> cfg.Config:
        if self._config is None:
            args = argparse.Namespace(config=self.config_path, dev=self.dev, port=None, no_auth_required=False)
            self._config = daemon_cli.build_config(args)
        return self._config

    @property
    def admin(self) -> QueueAdmin:
        if self._admin is None:
            self._admin = QueueAdmin(self.config.queue_path)
        return self._admin

    @property
    def passwords(self) -> PasswordFile:
        if self._passwords is None:
            self._passwords = PasswordFile(self.auth_file or self.config.smtp.auth_file)
        return self._passwords

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()


pass_ctl = click.make_pass_decorator(Ctl)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in docs/elemtactl.md).")(f)


class QueueIdType(click.ParamType):
    name = "ID"

    def convert(self, value, param, ctx):
        text = value.strip().upper()  # Crockford base32 reads either case
        if not ids.is_valid(text):
            self.fail(f"{value!r} is not a queue ID (13 characters, e.g. 0GJ4Z8K2M1N3P)", param, ctx)
        return text


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}  # seconds in a duration's unit


class DurationType(click.ParamType):
    """90, 90s, 30m, 2h, 1d, 1h30m."""

    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?|(\d+(\.\d+)?[smhd])+", text) is None:
            self.fail(f"{value!r} is not a duration (e.g. 90s, 30m, 2h, 1d, 1h30m)", param, ctx)
        return float(sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text)))


QUEUE_ID = QueueIdType()


@click.group(name="elemtactl", cls=Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", envvar="ELEMTA_CONFIG", show_envvar=True,
              help=f"Configuration file, as given to elemta (default {cfg.DEFAULT_PATH}).")
@click.option("--dev", is_flag=True,
              help="The queue of `elemta --dev` started in this directory (./dev-spool unless --config).")
@click.version_option(__version__, "-V", "--version", prog_name="elemtactl", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, dev: bool) -> None:
    """Look at and change elemta's mail queue; check and show its configuration;
    manage the users of SMTP AUTH.

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
        out = click.get_binary_stream("stdout")
        out.write(data)
        out.flush()
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
            if not _interactive():
                raise _usage_error(f"ALL would {what} every message: add --yes")
            if not click.confirm(f"{what.capitalize()} every message in {path}?", default=False, err=True):
                raise _usage_error(f"not confirmed: nothing to {what}")
        return ALL
    found: list[str] = []
    for word in words:
        if word == "-":
            for line in click.get_text_stream("stdin"):
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


def _interactive() -> bool:
    """Whether a person can answer the ALL question (tests replace this)."""
    return sys.stdin.isatty()


def _report(change: Change, as_json: bool) -> None:
    Output(as_json).change(change)
    if change.not_found:
        shown = ", ".join(change.not_found[:10]) + (", ..." if len(change.not_found) > 10 else "")
        raise CtlError(f"no such message: {shown}", EX_NOINPUT)


def _changer(name: str, allow_all: bool, doc: str, what: str) -> click.Command:
    """`queue hold|release|requeue|delete ID...`: the same command line, a different change."""

    def command(ctl: Ctl, words: tuple[str, ...], as_json: bool, yes: bool = False) -> None:
        targets = _targets(words, allow_all, yes, what, ctl.config.queue_path)
        _report(getattr(ctl.admin, name)(targets), as_json)

    command.__doc__ = doc
    decorators = [
        queue.command(name),
        click.argument("words", nargs=-1, required=True, metavar="ID... | -" + (" | ALL" if allow_all else "")),
        json_option,
    ]
    if allow_all:
        decorators.append(click.option("--yes", "-y", is_flag=True, help="Change ALL without asking."))
    decorators.append(pass_ctl)
    for decorate in reversed(decorators):
        command = decorate(command)
    return command


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
    _report(ctl.admin.flush(domain), as_json)


@queue.command()
@click.argument("queue_id", type=QUEUE_ID, metavar="ID")
@click.argument("level", type=click.Choice(PRIORITIES, case_sensitive=False), metavar="LEVEL")
@json_option
@pass_ctl
def priority(ctl: Ctl, queue_id: str, level: str, as_json: bool) -> None:
    """Set a message's priority (critical, high, normal, low)."""
    _report(ctl.admin.set_priority(queue_id, level.lower()), as_json)


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
    """Check the configuration as the daemon does (exit 78 if bad)."""
    from elemta.daemon import check_startup  # imported late: it loads the delivery code

    config = ctl.config
    check_startup(config)
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


# ---- user: the password file of SMTP AUTH --------------------------------------------------


@dataclass(frozen=True)
class UserListing:
    """What `user list --json` prints."""

    file: str
    users: list[User]
    problems: list[str]  # the lines the daemon skips, and why


@main.group("user")
@click.option("--file", "auth_file", metavar="FILE",
              help="The password file (default: smtp.auth_file of the configuration, /etc/elemta/passwd).")
@pass_ctl
def user_group(ctl: Ctl, auth_file: str | None) -> None:
    """Add, change, delete and list the users of SMTP AUTH."""
    ctl.auth_file = auth_file


def _user_name(name: str) -> str:
    problem = user_name_problem(name)
    if problem is not None:
        raise CtlError(f"{name!r}: {problem}", EX_DATAERR)
    return normalize(name)


def _new_password(from_stdin: bool) -> str:
    """The password: one line of stdin, or asked twice on the terminal without echo. Never
    an argument, which every user of the machine could read in ps(1)."""
    if from_stdin:
        line = click.get_text_stream("stdin").readline()
        password = line.removesuffix("\n").removesuffix("\r")
    elif not _interactive():
        raise _usage_error("no terminal to ask for the password: use --password-stdin")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Password again", err=True)
    problem = password_problem(password)
    if problem is not None:
        raise CtlError(problem if password or not from_stdin else "no password on standard input", EX_DATAERR)
    return password


def password_stdin_option(f):
    return click.option("--password-stdin", is_flag=True,
                        help="Read the password from the first line of standard input instead of asking.")(f)


@user_group.command("add")
@click.argument("name", metavar="USER")
@click.option("--cram-md5", is_flag=True,
              help="Also store the CRAM-MD5 secret. It is as good as the password to whoever reads the file.")
@password_stdin_option
@pass_ctl
def user_add(ctl: Ctl, name: str, cram_md5: bool, password_stdin: bool) -> None:
    """Add a user (usually an email address) with a password."""
    name = _user_name(name)
    if any(u.name == name for u in ctl.passwords.users()):  # before asking for a password
        raise UserExists(f"user {name} exists (use passwd to change its password)")
    ctl.passwords.set(name, _new_password(password_stdin), cram_md5, exists=False)
    click.echo(f"added user {name}" + (" with a CRAM-MD5 secret" if cram_md5 else ""))


@user_group.command("passwd")
@click.argument("name", metavar="USER")
@click.option("--cram-md5/--no-cram-md5", default=None,
              help="Store (or remove) the CRAM-MD5 secret too; by default it is kept if there was one.")
@password_stdin_option
@pass_ctl
def user_passwd(ctl: Ctl, name: str, cram_md5: bool | None, password_stdin: bool) -> None:
    """Change a user's password."""
    name = _user_name(name)
    if not any(u.name == name for u in ctl.passwords.users()):
        raise NoSuchUser(f"no such user: {name}")
    ctl.passwords.set(name, _new_password(password_stdin), cram_md5, exists=True)
    cram = ctl.passwords.cram_md5_secret(name) is not None
    click.echo(f"changed the password of {name}" + (" and its CRAM-MD5 secret" if cram else ""))


@user_group.command("delete")
@click.argument("name", metavar="USER")
@pass_ctl
def user_delete(ctl: Ctl, name: str) -> None:
    """Delete a user."""
    name = normalize(name)
    if not ctl.passwords.delete(name):
        raise NoSuchUser(f"no such user: {name}")
    click.echo(f"deleted user {name}")


@user_group.command("list")
@json_option
@pass_ctl
def user_list(ctl: Ctl, as_json: bool) -> None:
    """List the users (never their hashes).

    One line per user: its name and whether a CRAM-MD5 secret is stored.
    """
    passwords = ctl.passwords
    listing = UserListing(passwords.path, passwords.users(), passwords.problems())
    out = Output(as_json)
    if as_json:
        return out.json(listing)
    for problem in listing.problems:  # what the daemon skips: worth a warning, not a failure
        click.echo(f"elemtactl: warning: {listing.file}: {problem}", err=True)
    if not listing.users:
        return out.note(f"No users in {listing.file}.")
    if not out.terminal:
        for u in listing.users:
            out.line(u.name, u.cram_md5)
        return None
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("User")
    table.add_column("CRAM-MD5")
    for u in listing.users:
        table.add_row(u.name, "yes" if u.cram_md5 else "no")
    out.console.print(table)
    return None


if __name__ == "__main__":
    sys.exit(main(prog_name="elemtactl"))  # not "python -m ...", in usage and error lines
