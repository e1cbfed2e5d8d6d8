"""What sendmail's modes share (sendmail.py submits, sendmail_modes.py does the rest): the
options, the sysexits codes, the config and the maildrop write."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from elemta import config as cfg
from elemta import maildrop
from elemta.errors import ConfigError

# sysexits.h
EX_USAGE, EX_DATAERR, EX_UNAVAILABLE = 64, 65, 69
EX_IOERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 74, 75, 77, 78

CONFIG_ENV = "ELEMTA_CONFIG"


class Usage(Exception):
    """A bad command line: exit 64 with the message."""


class Failure(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Options:
    mode: str = "m"  # -bm deliver (the default), -bs SMTP on stdin, -bp list, -bi aliases, q flush
    extract: bool = False  # -t
    dot_ends: bool = True  # without -i/-oi a line "." ends the message
    sender: str | None = None  # -f/-r
    full_name: str = ""  # -F
    notify: tuple[str, ...] = ()  # -N
    ret: str | None = None  # -R
    envid: str | None = None  # -V
    body_type: str | None = None  # -B
    config: str | None = None  # -C
    recipients: list[str] = field(default_factory=list)


def load_config(path: str | None) -> cfg.Config:
    """The daemon's config, for the maildrop's place, the size limit and the host name.  An
    ordinary user who may not read it gets the defaults (the default maildrop)."""
    path = path or os.environ.get(CONFIG_ENV) or cfg.DEFAULT_PATH
    try:
        return cfg.load(path)
    except ConfigError as exc:
        if not os.path.exists(path) or not os.access(path, os.R_OK):
            return cfg.Config(source="(defaults)")
        raise Failure(EX_CONFIG, str(exc)) from None


def write_drop(config: cfg.Config, drop: maildrop.Drop, name: str | None = None) -> str:
    directory = config.maildrop_path
    try:
        return maildrop.write(directory, drop, name)
    except OSError as exc:
        reason = f"cannot write to the maildrop {directory}: {exc.strerror or exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EINTR):
            raise Failure(EX_TEMPFAIL, reason) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise Failure(EX_NOPERM, reason) from None
        if exc.errno == errno.ENOENT:
            raise Failure(EX_UNAVAILABLE, reason + " (has elemta been started once?)") from None
        raise Failure(EX_IOERR, reason) from None
