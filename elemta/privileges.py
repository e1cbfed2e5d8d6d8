"""Who elemta runs as: started as root, it becomes server.user before it does anything else.

Under systemd elemta starts as User=elemta with AmbientCapabilities=CAP_NET_BIND_SERVICE and
has nothing to drop.  Started as root by hand (or by an init script), it first makes the
spool and the maildrop belong to server.user, then takes that user's identity for good
(supplementary groups, group, user) and keeps one capability, CAP_NET_BIND_SERVICE, so the
listeners on ports 25, 465 and 587 can still be bound, at start and by a reload, exactly as
under systemd.  The supervisor, every SMTP worker and the delivery process then run as that
user: no session, delivery or plugin ever runs as root, and every file is opened as the user
that will use it (a key the service cannot read fails at start, not at the first STARTTLS).
"""

from __future__ import annotations

import ctypes
import dataclasses
import grp
import os
import pwd

from elemta import filemodes
from elemta.config import Config
from elemta.errors import ConfigError

# linux/prctl.h and linux/capability.h
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_NET_BIND_SERVICE = 10


@dataclasses.dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def target(config: Config, euid: int | None = None) -> Identity | None:
    """The identity to take, or None to keep the current one (not root, dev mode, or
    server.user = "root").  ConfigError when the user or group does not exist."""
    if (os.geteuid() if euid is None else euid) != 0 or config.dev or config.server.user == "root":
        return None
    name = config.server.user
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"server.user: no such user {name!r} (create it: adduser --system --group {name}; "
            f'or set server.user = "root" to run as root, not recommended)'
        ) from None
    if user.pw_uid == 0:
        raise ConfigError(f'server.user: {name!r} is root; name an unprivileged user (or "root" to say so)')
    gid = user.pw_gid
    if config.server.group:
        try:
            gid = grp.getgrnam(config.server.group).gr_gid
        except KeyError:
            raise ConfigError(f"server.group: no such group {config.server.group!r}") from None
    return Identity(name, user.pw_uid, gid)


def service_gid(config: Config) -> int | None:
    """The group the service runs in (server.group, else server.user's primary group), for
    files an admin's command makes that the daemon must read; None if there is no such user
    or group, or the service runs as root."""
    if config.server.user == "root":
        return None
    try:
        if config.server.group:
            return grp.getgrnam(config.server.group).gr_gid
        return pwd.getpwnam(config.server.user).pw_gid
    except KeyError:
        return None


def prepare_dirs(config: Config, who: Identity | None) -> None:
    """The spool (0750) and the maildrop (3733), created if missing and, as root, given to who.

    A spool an elemta running as root left behind is given to who as well.  Raises OSError.
    """
    uid, gid = (who.uid, who.gid) if who else (-1, -1)
    spool = config.server.spool_dir
    filemodes.ensure_dir(spool, filemodes.SPOOL_MODE, uid, gid)
    if who is not None:
        filemodes.chown_tree(spool, uid, gid)
    filemodes.ensure_dir(config.maildrop_path, filemodes.MAILDROP_MODE, uid, gid, exact=True)


def drop(who: Identity) -> None:
    """Become who for good, keeping only CAP_NET_BIND_SERVICE.  Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.initgroups(who.user, who.gid)  # the user's groups too: ssl-cert for Debian's key files
    os.setgid(who.gid)
    # Keep the permitted capabilities across setuid (they are cleared otherwise), then narrow
    # them to the one we need; an execve (we do none) would clear them anyway.
    keep = libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0
    os.setuid(who.uid)
    if keep:
        _keep_only_bind_capability(libc)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # as systemd's NoNewPrivileges=
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError(f"still able to become root after dropping to {who.user}")


def _keep_only_bind_capability(libc) -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (Data * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_NET_BIND_SERVICE
    if libc.capset(ctypes.byref(header), data) != 0:
        # No capability kept: listeners on ports below 1024 can no longer be added by a reload.
        libc.capset(ctypes.byref(header), (Data * 2)())

