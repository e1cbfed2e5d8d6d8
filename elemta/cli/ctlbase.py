"""What every elemtactl command shares: exit statuses (sysexits(3)), the one-line error,
the root group that maps elemta's errors to exit statuses, the lazily built context (config,
queue, password file) and the common option types.  The command modules import this, never
elemtactl.py, which bin/elemtactl runs as __main__."""

from __future__ import annotations

import argparse
import os
import re
import sys

import click

from elemta import config as cfg
from elemta import privileges
from elemta.cli import elemta as daemon_cli
from elemta.errors import ConfigError, ElemtaError, QueueError
from elemta.passwords import (
    BadPassword,
    BadUserName,
    NoSuchUser,
    PasswordFile,
    PasswordFileUnavailable,
    PasswordFileWriteError,
    UserExists,
)
from elemta.queue import ids
from elemta.queue.admin import (
    NoSuchMessage,
    QueueAdmin,
    QueueBusy,
    QueuePermissionError,
    QueueUnavailable,
)

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
        # click declares exit_code on the class; each CtlError carries its own sysexits status.
        self.exit_code = exit_code  # type: ignore[misc]
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
            group = self.service_gid() if os.geteuid() == 0 else None
            self._passwords = PasswordFile(self.auth_file or self.config.smtp.auth_file, new_file_group=group)
        return self._passwords

    def service_gid(self) -> int | None:
        """The daemon's group, for files root makes that the daemon reads (None if unknown)."""
        try:
            return privileges.service_gid(self.config)
        except ConfigError:
            return None

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


def _interactive() -> bool:
    """Whether a person can answer the ALL question (tests replace this)."""
    return sys.stdin.isatty()
