"""Pickup: the daemon's side of the maildrop (maildrop.py), run by the process that delivers.

Every second, and at once when woken, it looks for ready files in server.maildrop_dir and
takes each into the queue: the envelope is checked (anyone on the host can write a file, so
nothing in it is trusted), the submitter is the file's owner as the kernel recorded it, and
the message gets the header fields a local submission lacks (Received with the submitter's
UID, From, Date, Message-ID), as Postfix's pickup and cleanup add them.  The file is removed
once the queue's transaction committed; a crash between the two sends the message twice,
never zero times.  A file that is not a regular file, has other links, is too big or holds a
bad envelope is removed with a log line naming its owner.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import secrets
import stat
import threading
import time
from collections.abc import Callable

from elemta import log as logmod
from elemta import maildrop
from elemta.errors import QueueError
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.store import Store
from elemta.smtp import address as addr
from elemta.smtp import dotreader

INTERVAL = 1.0  # seconds between looks when nothing wakes it
STALE = 86400.0  # a file never marked ready (its sendmail died) is removed after a day
ENVELOPE_SLACK = maildrop.MAX_ENVELOPE + 4096


class Pickup:
    def __init__(self, directory: str, store: Store, hostname: str, max_message_size: int,
                 events: logmod.EventLog, *, hold: bool = False, on_enqueued: Callable[[], None] = lambda: None):
        self.directory = directory
        self.store = store
        self.hostname = hostname
        self.max_size = max_message_size
        self.events = events
        self.hold = hold
        self.on_enqueued = on_enqueued
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._names: dict[int, tuple[str, str]] = {}  # uid -> (login, GECOS name)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pickup", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop:
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001 -- the thread must go on; files stay for the next look
                self.events("pickup_error", level=logmod.ERROR, error=str(exc)[:300])
            self._wake.wait(INTERVAL)
            self._wake.clear()

    def scan(self) -> int:
        """Take every ready file into the queue; returns how many were queued."""
        try:
            names = [entry.name for entry in os.scandir(self.directory) if maildrop.is_name(entry.name)]
        except FileNotFoundError:
            return 0
        queued = 0
        for name in sorted(names):
            if self._stop:
                break
            queued += self._take(name)
        return queued

    def _take(self, name: str) -> int:
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            return 0  # its submitter took it back
        except OSError as exc:  # a symlink (ELOOP), or a file made unreadable by its owner
            self._discard(path, None, f"cannot open it: {exc.strerror or exc}")
            return 0
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                self._discard(path, st.st_uid, "not a regular file with one link")
                return 0
            if not st.st_mode & maildrop.READY_BIT:
                if time.time() - st.st_mtime > STALE:
                    self._discard(path, st.st_uid, "never completed by sendmail")
                return 0
            if st.st_size > self.max_size + ENVELOPE_SLACK:
                self._discard(path, st.st_uid, f"larger than smtp.max_message_size ({st.st_size} octets)")
                return 0
            data = _read_all(fd, self.max_size + ENVELOPE_SLACK)
        finally:
            os.close(fd)
        try:
            if data is None:
                raise ValueError("grew past smtp.max_message_size while being read")
            drop = maildrop.decode(data)
            if len(drop.body) > self.max_size:
                raise ValueError(f"larger than smtp.max_message_size ({len(drop.body)} octets)")
            message = self._message(drop, st.st_uid)
        except (ValueError, addr.AddressError) as exc:
            self._discard(path, st.st_uid, str(exc))
            return 0
        try:
            self.store.enqueue(message)
        except QueueError as exc:  # full disk, queue limits: the file waits for the next look
            self.events("pickup_deferred", level=logmod.WARNING, file=name, uid=st.st_uid, error=str(exc)[:200])
            return 0
        os.unlink(path)
        self.events("pickup", qid=message.queue_id, uid=st.st_uid, sender=f"<{message.sender}>",
                    nrcpt=len(message.recipients), size=len(message.body))
        self.on_enqueued()
        return 1

    def _message(self, drop: maildrop.Drop, uid: int) -> NewMessage:
        login, gecos = self._user(uid)
        smtputf8 = drop.smtputf8
        if drop.sender is None:
            sender = f"{login}@{self.hostname}"
        else:
            sender = str(addr.parse_path(f"<{drop.sender}>", smtputf8=True, allow_null=True, allow_postmaster=False))
        recipients = []
        for rcpt in drop.recipients:
            parsed = addr.parse_path(f"<{rcpt.address}>", smtputf8=True, allow_null=False, allow_postmaster=True)
            recipients.append(NewRecipient(str(parsed), rcpt.orcpt, tuple(n.upper() for n in rcpt.notify)))
            smtputf8 = smtputf8 or parsed.needs_smtputf8
        if not sender.isascii():
            smtputf8 = True
        queue_id = self.store.new_id()
        now = time.time()
        body = drop.body
        added = b""
        if not dotreader.has_field(body, b"from"):  # RFC 5322 §3.6.2: the author, or -f's address
            name = drop.full_name or gecos
            author = sender if drop.sender else f"{login}@{self.hostname}"
            added += f"From: {email.utils.formataddr((name, author))}\r\n".encode("utf-8", "replace")
        if not dotreader.has_field(body, b"date"):
            added += f"Date: {email.utils.formatdate(now, localtime=True)}\r\n".encode()
        if not dotreader.has_field(body, b"message-id"):
            added += f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{self.hostname}>\r\n".encode()
        # RFC 5321 §4.4: the trace field; the UID is the kernel's word, not the submitter's.
        received = (f"Received: by {self.hostname} (elemta, from userid {uid})\r\n"
                    f"\tid {queue_id}; {email.utils.formatdate(now, localtime=True)}\r\n").encode()
        return NewMessage(
            queue_id=queue_id, sender=sender, recipients=tuple(recipients),
            body=received + added + body, hold=self.hold, envid=drop.envid, ret=drop.ret,
            body_type=drop.body_type, smtputf8=smtputf8, client_ip="", client_helo="",
            listener="maildrop", received_at=now,
        )

    def _user(self, uid: int) -> tuple[str, str]:
        if uid not in self._names:
            try:
                entry = pwd.getpwuid(uid)
                self._names[uid] = (entry.pw_name, entry.pw_gecos.split(",")[0])
            except KeyError:
                self._names[uid] = (f"uid{uid}", "")
        return self._names[uid]

    def _discard(self, path: str, uid: int | None, reason: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
        self.events("pickup_rejected", level=logmod.WARNING, file=os.path.basename(path),
                    uid="-" if uid is None else uid, error=reason[:200])


def _read_all(fd: int, limit: int) -> bytes | None:
    """The file's bytes; None if there are more than limit (its owner may still be writing)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
