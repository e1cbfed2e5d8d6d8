"""The password file of SMTP AUTH (smtp.auth_file): who may log in, and with what.

One user per line, `user:hash[:cram]`; blank lines and lines starting with '#' are skipped.

  user  the login name, usually an email address; compared without regard to case (as
        local.py compares addresses), stored in lower case; no ':', white space or control
        characters.
  hash  scrypt (RFC 7914), salted: `$scrypt$ln=14,r=8,p=1$<salt>$<key>`, salt and key in
        base64.  The cost is read from each line, so raising SCRYPT_LN later leaves the old
        lines valid (`elemtactl user passwd` rewrites them).
  cram  only when the admin asks for it: the CRAM-MD5 secret in base64.  RFC 2195 §3 needs
        the server to hold the password itself (HMAC-MD5 is keyed with it), so this field is
        as good as the password to whoever reads the file.

The daemon reads the file (PasswordFile.check_password, cram_md5_secret) and notices a new
version by its (inode, size, mtime, ctime), looked at no more than once a second; elemtactl
writes it (set, delete) under an flock, through a temporary file and rename, so a reader sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import binascii
import fcntl
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from elemta.errors import ElemtaError
from elemta.passhash import b64, hash_password, parse_hash, unb64, verify_hash

RELOAD_INTERVAL = 1.0  # seconds between looks at the file's inode, size and times
CACHE_SECONDS = 60.0  # how long a verified (user, password) skips scrypt
CACHE_MAX = 10_000



class PasswordFileError(ElemtaError):
    """A password file operation failed; the text never holds a password."""


class PasswordFileUnavailable(PasswordFileError):
    """The file exists but cannot be read (permission, I/O): no one can log in for now."""

    def __init__(self, message: str, permission: bool = False) -> None:
        super().__init__(message)
        self.permission = permission


class PasswordFileWriteError(PasswordFileError):
    """The file could not be written (directory missing or read-only, permission)."""

    def __init__(self, message: str, permission: bool = False) -> None:
        super().__init__(message)
        self.permission = permission


class BadUserName(PasswordFileError):
    pass


class BadPassword(PasswordFileError):
    pass


class UserExists(PasswordFileError):
    pass


class NoSuchUser(PasswordFileError):
    pass


@dataclass(frozen=True)
class User:
    """What `elemtactl user list` shows: never the hash."""

    name: str
    cram_md5: bool  # a CRAM-MD5 secret is stored (password-equivalent)


@dataclass(frozen=True)
class _Entry:
    name: str
    hash: str
    cram: bytes | None


# ---- names, passwords and hashes --------------------------------------------------------------


def user_name_problem(name: str) -> str | None:
    """Why `name` cannot be a user name, or None if it can."""
    if not name:
        return "the user name is empty"
    if ":" in name:
        return "a user name cannot contain ':'"
    if any(c.isspace() for c in name):
        return "a user name cannot contain white space"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        return "a user name cannot contain control characters"
    if len(name.encode("utf-8")) > 255:
        return "a user name is at most 255 octets"
    return None


def normalize(name: str) -> str:
    # Mail clients send the login as typed ("Alice@Example.com" after a phone capitalised it);
    # addresses compare without case everywhere in practice (see local.py), logins do too.
    return name.lower()


def password_problem(password: str) -> str | None:
    if not password:
        return "the password is empty"
    if "\0" in password or "\r" in password or "\n" in password:
        return "a password cannot contain NUL or line breaks"  # PLAIN could not carry it
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        return "the password is not valid UTF-8"
    return None


# ---- the file -------------------------------------------------------------------------------


@dataclass
class _Parsed:
    entries: dict[str, _Entry]  # by normalised name
    problems: list[str]


def parse(text: str) -> _Parsed:
    """The users of a password file's text, and a reason for each line that was skipped."""
    entries: dict[str, _Entry] = {}
    lines: dict[str, int] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = _parse_line(line)
        if entry is None:
            continue
        if isinstance(entry, str):
            problems.append(f"line {number}: {entry}; line skipped")
        elif entry.name in entries:
            problems.append(f"line {number}: {entry.name} again (first on line {lines[entry.name]}); line skipped")
        else:
            entries[entry.name] = entry
            lines[entry.name] = number
    return _Parsed(entries, problems)


def _parse_line(line: str) -> _Entry | str | None:
    """An entry, the reason a line is not one, or None for a blank line or comment."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":")
    if len(fields) not in (2, 3):
        return f"{len(fields)} ':'-separated fields, not user:hash or user:hash:cram"
    name = fields[0]
    problem = user_name_problem(name)
    if problem is not None:
        return problem
    try:
        parse_hash(fields[1])
    except ValueError as exc:
        return str(exc)
    cram = None
    if len(fields) == 3:
        try:
            cram = unb64(fields[2])
        except (binascii.Error, ValueError):
            return "the CRAM-MD5 secret is not base64"
        if not cram:
            return "the CRAM-MD5 secret is empty"
    return _Entry(normalize(name), fields[1], cram)


def _format(entry: _Entry) -> str:
    line = f"{entry.name}:{entry.hash}"
    return line + f":{b64(entry.cram)}" if entry.cram is not None else line


class PasswordFile:
    """The users of one password file, re-read when it changes; thread-safe.

    For checks (the daemon): a missing file is no users; an unreadable one makes
    check_password() return None and cram_md5_secret() raise PasswordFileUnavailable, so the
    client is told to try later (454) rather than that its password is wrong.
    """

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic,
                 new_file_group: int | None = None) -> None:
        self.path = path
        self.new_file_group = new_file_group  # a GID for a file set() creates; None = the directory's
        self._clock = clock
        self._lock = threading.Lock()
        self._key: tuple | None = None  # (inode, size, mtime_ns, ctime_ns) of what was read
        self._checked_at: float | None = None
        self._parsed = _Parsed({}, [])
        self._error: PasswordFileUnavailable | None = None
        self._dummy: str | None = None
        # Successful checks, by HMAC(key, user NUL password) -> when they expire.  Safe to
        # keep: only successes are cached (every wrong guess still pays a full scrypt), the
        # key is random, per process and never stored, so the table says nothing about
        # passwords to anyone who cannot read this process's memory, and whoever can reads
        # the passwords as clients send them anyway.  It is emptied whenever the file changes,
        # so a new password or a deleted user takes effect at the next reload.
        self._cache_key = secrets.token_bytes(32)
        self._cache: dict[bytes, float] = {}

    # ---- reading --------------------------------------------------------------------------

    def check_password(self, user: str, password: str) -> bool | None:
        """True if user exists and password is its password; None if the file cannot be read."""
        try:
            entries = self._current()
        except PasswordFileUnavailable:
            return None
        name = normalize(user)
        token = hmac.new(self._cache_key, name.encode("utf-8", "surrogatepass") + b"\0"
                         + password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        now = self._clock()
        with self._lock:
            expires = self._cache.get(token)
        if expires is not None and expires > now:
            return True
        entry = entries.get(name)
        try:
            if entry is None:
                # An unknown user costs one hash too, so the time of the answer does not
                # tell which user names exist.
                verify_hash(self._dummy_hash(), password)
                return False
            ok = verify_hash(entry.hash, password)
        except (ValueError, UnicodeEncodeError):
            return False  # a password that is not UTF-8 (lone surrogates) matches nothing
        if ok:
            with self._lock:
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
                self._cache[token] = now + CACHE_SECONDS
        return ok

    def cram_md5_secret(self, user: str) -> bytes | None:
        """The user's CRAM-MD5 secret, None if it has none or does not exist; raises
        PasswordFileUnavailable if the file cannot be read."""
        entry = self._current().get(normalize(user))
        return entry.cram if entry is not None else None

    def users(self) -> list[User]:
        """The users, in the file's order (raises PasswordFileUnavailable)."""
        return [User(e.name, e.cram is not None) for e in self._current().values()]

    def problems(self) -> list[str]:
        """Why lines of the file were skipped ("line 3: ..."), as of the last read."""
        self._current()
        with self._lock:
            return list(self._parsed.problems)

    def _current(self) -> dict[str, _Entry]:
        with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= RELOAD_INTERVAL:
                self._checked_at = now
                self._reload()
            if self._error is not None:
                raise self._error
            return self._parsed.entries

    def _reload(self) -> None:
        """Read the file again if it is another one than last time (called under the lock)."""
        try:
            st = os.stat(self.path)
            if self._error is None and _stat_key(st) == self._key:
                return
            with open(self.path, encoding="utf-8", errors="surrogateescape") as handle:
                key = _stat_key(os.fstat(handle.fileno()))
                text = handle.read()
        except FileNotFoundError:
            key, text = None, ""
        except OSError as exc:
            self._error = _unavailable(self.path, exc)
            self._key = None
            return
        self._error = None
        if key is None or key != self._key:
            self._parsed = parse(text)
            self._cache.clear()
        self._key = key

    def _dummy_hash(self) -> str:
        with self._lock:
            if self._dummy is None:
                self._dummy = hash_password(secrets.token_urlsafe(16))
            return self._dummy

    def _invalidate(self) -> None:
        with self._lock:
            self._checked_at = None
            self._key = None

    # ---- writing (elemtactl) --------------------------------------------------------------

    def set(self, user: str, password: str, cram_md5: bool | None = False, *,
            exists: bool | None = None) -> bool:
        """Give user the password (adding the user if new); True if the user existed.

        cram_md5: True stores the CRAM-MD5 secret, False removes it, None keeps it if the
        user had one.  exists: True requires the user to exist (NoSuchUser), False requires it
        not to (UserExists), None takes either.
        """
        problem = user_name_problem(user)
        if problem is not None:
            raise BadUserName(f"{user!r}: {problem}")
        problem = password_problem(password)
        if problem is not None:
            raise BadPassword(problem)
        name = normalize(user)
        hashed = hash_password(password)  # before the lock: others need not wait for scrypt

        def change(lines: list[str]) -> bool:
            index = _find(lines, name)
            if exists is True and index is None:
                raise NoSuchUser(f"no such user: {name}")
            if exists is False and index is not None:
                raise UserExists(f"user {name} exists (use passwd to change its password)")
            entry = _parse_line(lines[index]) if index is not None else None
            had_cram = isinstance(entry, _Entry) and entry.cram is not None
            keep = had_cram if cram_md5 is None else cram_md5
            line = _format(_Entry(name, hashed, password.encode("utf-8") if keep else None))
            if index is None:
                lines.append(line)
            else:
                lines[index] = line
            return index is not None

        return self._rewrite(change)

    def delete(self, user: str) -> bool:
        """Remove user; False if there was no such user."""
        name = normalize(user)

        def change(lines: list[str]) -> bool:
            index = _find(lines, name)
            if index is not None:
                del lines[index]
            return index is not None

        return self._rewrite(change)

    def _rewrite(self, change: Callable[[list[str]], bool]) -> bool:
        """Apply change to the file's lines under the lock; write the result if it changed.

        Lines that are not the user's (comments, lines the reader skips) are kept as they are.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PasswordFileWriteError(f"{self.path}: cannot create its lock file {self.path}.lock: "
                                         f"{exc.strerror or exc}", isinstance(exc, PermissionError)) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # writers one at a time; readers never wait
            try:
                with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
                    text = handle.read()
                    st = os.fstat(handle.fileno())
            except FileNotFoundError:
                text, st = "", None
            except OSError as exc:
                raise _write_error(self.path, exc) from None
            lines = text.splitlines()
            before = list(lines)
            result = change(lines)
            if lines != before:
                _replace(self.path, directory, "".join(line + "\n" for line in lines), st, self.new_file_group)
        finally:
            os.close(lock)  # closing it releases the flock
        self._invalidate()
        return result


def _find(lines: list[str], name: str) -> int | None:
    """The index of the first valid line of user name (the one readers use)."""
    for index, line in enumerate(lines):
        entry = _parse_line(line)
        if isinstance(entry, _Entry) and entry.name == name:
            return index
    return None


def _replace(path: str, directory: str, text: str, st: os.stat_result | None, group: int | None = None) -> None:
    """Write text as path's new version: temporary file, fsync, rename, fsync the directory."""
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        try:
            if st is not None:
                # Keep who may read it: the daemon reads it through its group.
                _chown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, st.st_mode & 0o7777)
            else:
                # A new file gets the service's group (or the directory's) and 0640: the
                # daemon reads it through its group and other users do not.
                try:
                    os.fchown(fd, -1, os.stat(directory).st_gid if group is None else group)
                except PermissionError:
                    pass
                os.fchmod(fd, 0o640)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", closefd=False) as out:
                out.write(text)
                out.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _chown(fd: int, uid: int, gid: int) -> None:
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        os.fchown(fd, -1, gid)  # not root: the owner becomes us, the group must stay


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _unavailable(path: str, exc: OSError) -> PasswordFileUnavailable:
    return PasswordFileUnavailable(f"{path}: {exc.strerror or exc}", isinstance(exc, PermissionError))


def _write_error(path: str, exc: OSError) -> PasswordFileWriteError:
    return PasswordFileWriteError(f"{path}: {exc.strerror or exc}", isinstance(exc, PermissionError))
