"""`elemtactl user`: the password file of SMTP AUTH (passwords.py), which the daemon re-reads
when it changes."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click
from rich import box
from rich.table import Table

from elemta.cli import ctlbase
from elemta.cli.ctlbase import (
    EX_DATAERR,
    Ctl,
    CtlError,
    _usage_error,
    json_option,
    pass_ctl,
)
from elemta.cli.render import Output
from elemta.passwords import (
    NoSuchUser,
    User,
    UserExists,
    normalize,
    password_problem,
    user_name_problem,
)

# ---- user: the password file of SMTP AUTH --------------------------------------------------


@dataclass(frozen=True)
class UserListing:
    """What `user list --json` prints."""

    file: str
    users: list[User]
    problems: list[str]  # the lines the daemon skips, and why


@click.group("user")
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
        line = sys.stdin.readline()  # click.get_text_stream is deprecated since click 8.5
        password = line.removesuffix("\n").removesuffix("\r")
    elif not ctlbase._interactive():
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
