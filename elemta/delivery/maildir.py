"""Delivery into a Maildir: write in tmp/, fsync, link into new/ (the Maildir protocol).

The file appears in new/ only complete and on disk, so a mail reader never sees half a
message and a crash leaves at most a stray file in tmp/. The path template takes %d (domain)
and %u (local part), both lower-cased and checked so an address cannot climb out of it.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

_counter = itertools.count()
# The host part of Maildir file names; '/' and ':' would break the name (':' starts its info).
_HOST = socket.gethostname().replace("/", "_").replace(":", "_")


class MaildirError(Exception):
    def __init__(self, text: str, permanent: bool) -> None:
        super().__init__(text)
        self.permanent = permanent


def mailbox_path(template: str, address: str) -> str:
    local, _, domain = address.rpartition("@")
    local, domain = local.lower(), domain.lower()
    for part in (local, domain):
        if not part or part.startswith(".") or "/" in part or "\0" in part:
            raise MaildirError(f"<{address}>: cannot be used in a Maildir path", permanent=True)
    return template.replace("%d", domain).replace("%u", local)


def deliver(template: str, address: str, body: bytes, return_path: str) -> str:
    """Write one message for `address`; return the file name. MaildirError on failure."""
    root = mailbox_path(template, address)
    try:
        # Owner-only, whatever the umask: makedirs gives its mode to the last directory only.
        os.makedirs(root, mode=0o700, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
        name = f"{time.time():.6f}.P{os.getpid()}Q{next(_counter)}.{_HOST}"
        tmp = os.path.join(root, "tmp", name)
        # Return-Path is added at final delivery (RFC 5321 §4.4); the stored body has CRLF,
        # and Maildir files use the local line ending.
        data = f"Return-Path: <{return_path}>\n".encode() + body.replace(b"\r\n", b"\n")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, os.path.join(root, "new", name))
        os.unlink(tmp)
        dir_fd = os.open(os.path.join(root, "new"), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        # A full disk or a permission problem is the admin's to fix: retry, don't bounce.
        raise MaildirError(f"maildir {root}: {exc.strerror or exc}", permanent=False) from exc
    return name
