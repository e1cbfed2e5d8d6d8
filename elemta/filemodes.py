"""The modes of the files elemta keeps: private keys and passwords, the spool, the maildrop.

elemta's processes run with umask 027 (set at start, whatever they inherited), so what they
create is readable by their own user and group only; the functions here make the directories
they depend on right, and refuse secrets that others can read, as sshd refuses a host key
readable by others.
"""

from __future__ import annotations

import os
import stat

from elemta.errors import ConfigError

UMASK = 0o027
SPOOL_MODE = 0o750  # the queue: the service user, read by its group (admins in group elemta)
# The maildrop: anyone may create a file (-wx), no one but the service may list it (no r), a
# user may remove only their own files (sticky), and every file gets the service's group
# (setgid), so the service can read a file its submitter made mode 0640.  As Postfix's
# maildrop, but without a setgid postdrop program, which a Python script cannot be.
MAILDROP_MODE = 0o3733


class SecretFileError(ConfigError):
    """A private key or password file that others can read, or that elemta cannot read."""


def check_secret(path: str, key: str) -> None:
    """Refuse a secret file readable or writable by others, or one this process cannot read.

    key is the config key that names it, for the one-line error.  The file itself is checked
    (a symlink, such as certbot's live/ links, is followed).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise SecretFileError(f"{key}: {path}: {exc.strerror or exc} (read as user {current_user()})") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"{key}: {path}: not a regular file")
    if st.st_mode & 0o006:
        raise SecretFileError(
            f"{key}: {path}: readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run chmod o-rwx {path}"
        )


def current_user() -> str:
    """This process's user name (its UID if it has none), for messages."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return str(os.geteuid())


def ensure_dir(path: str, mode: int, uid: int = -1, gid: int = -1, *, exact: bool = False) -> None:
    """Create path (and its parents) if missing; give it mode, and uid:gid when given.

    A directory this call creates gets mode exactly.  An existing one too when exact; else it
    keeps stricter group and other bits than mode asks for (an admin's 0700 spool stays 0700)
    but loses any that mode does not grant.  As root this also fixes the owner; as another user
    it can change only a directory it owns (else OSError).
    """
    try:
        os.mkdir(path, 0o700)
        exact = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.mkdir(path, 0o700)
        exact = True
    st = os.stat(path, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path}: not a directory")
    if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
        os.chown(path, uid, gid, follow_symlinks=False)
    current = stat.S_IMODE(st.st_mode)
    wanted = mode if exact else (mode & 0o7700) | (current & mode & 0o077)
    if current != wanted:
        os.chmod(path, wanted)


def chown_tree(path: str, uid: int, gid: int, only_from: int = 0) -> int:
    """Give path and what is below it to uid:gid where root (only_from) owns it: the spool of an
    elemta that ran as root before.  Symlinks are changed themselves, never followed.  Returns
    how many entries changed."""
    changed = 0
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, n) for n in dirs + files)):
            st = os.lstat(name)
            if st.st_uid == only_from:
                os.chown(name, uid, gid, follow_symlinks=False)
                changed += 1
    return changed
