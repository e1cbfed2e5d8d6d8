"""The maildrop: how sendmail(8) hands a message to the daemon, even while the daemon is down.

A local program runs `sendmail` as its own user; that user cannot write the queue (it is
server.user's, mode 0750), and a Python program cannot be setgid like Postfix's postdrop.  So
sendmail writes one file into server.maildrop_dir, a directory in which everyone may create
files but no one but the service may list them (mode 3733, see filemodes.py), and the daemon
takes each file into the queue and removes it (pickup.py).  The kernel records who made the
file (its owner), so the submitter's UID in the Received field cannot be forged; sendmail
exits 0 only after the file and its "ready" mark are on disk, so a message given to a stopped
daemon waits in the maildrop until the next start.

A file is one line of JSON (the envelope) after a magic word, then the message in CRLF form:

    elemta-maildrop 1 {"sender": ..., "recipients": [...], ...}\\n<message>

It is created mode 0640 (group: the service's, from the directory's setgid bit), written and
fsynced, then marked ready by its owner's execute bit and fsynced again; the daemon takes only
ready files (an interrupted sendmail leaves a file without the mark, removed after a day).
The name is random (128 bits): others cannot list the directory, nor guess a name to open.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat

from elemta.queue.model import NewRecipient

MAGIC = b"elemta-maildrop 1 "
FILE_MODE = 0o640
READY_BIT = stat.S_IXUSR
MAX_ENVELOPE = 1 << 20  # octets of the JSON line: room for 10,000 long recipients
NAME_PREFIX = "m"


@dataclasses.dataclass(frozen=True)
class Drop:
    """One locally submitted message."""

    recipients: tuple[NewRecipient, ...]
    body: bytes  # the message, CRLF line endings, without a Received field
    sender: str | None = None  # None: the submitter's login name at server.hostname; "" = <>
    full_name: str = ""  # sendmail -F: the name in a From: field the daemon adds
    envid: str | None = None  # RFC 3461 ENVID (sendmail -V)
    ret: str | None = None  # RFC 3461 RET (sendmail -R)
    body_type: str = "8BITMIME"
    smtputf8: bool = False


def new_name() -> str:
    return NAME_PREFIX + os.urandom(16).hex()


def is_name(name: str) -> bool:
    return (len(name) == 33 and name.startswith(NAME_PREFIX)
            and all(c in "0123456789abcdef" for c in name[1:]))


def encode(drop: Drop) -> bytes:
    envelope = {
        "sender": drop.sender,
        "recipients": [{"address": r.address, "orcpt": r.orcpt, "notify": list(r.notify)} for r in drop.recipients],
        "full_name": drop.full_name,
        "envid": drop.envid,
        "ret": drop.ret,
        "body_type": drop.body_type,
        "smtputf8": drop.smtputf8,
    }
    return MAGIC + json.dumps(envelope, ensure_ascii=True).encode("ascii") + b"\n" + drop.body


def decode(data: bytes) -> Drop:
    """The Drop in a file's bytes; ValueError naming what is wrong (anyone can write one)."""
    if not data.startswith(MAGIC):
        raise ValueError("not a maildrop file")
    end = data.find(b"\n", 0, len(MAGIC) + MAX_ENVELOPE)
    if end < 0:
        raise ValueError("no envelope line")
    try:
        env = json.loads(data[len(MAGIC):end])
    except ValueError:
        raise ValueError("the envelope is not JSON") from None
    if not isinstance(env, dict):
        raise ValueError("the envelope is not an object")

    def text(key: str, optional: bool = True) -> str | None:
        value = env.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise ValueError(f"{key}: expected one line of text")
        return value

    recipients = []
    raw = env.get("recipients")
    if not isinstance(raw, list) or not raw:
        raise ValueError("recipients: expected a non-empty list")
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("address"), str) or not item["address"]:
            raise ValueError("recipients: each needs an address")
        notify = item.get("notify") or []
        if not isinstance(notify, list) or not all(isinstance(n, str) for n in notify):
            raise ValueError("recipients: notify must be a list of keywords")
        orcpt = item.get("orcpt")
        if orcpt is not None and not isinstance(orcpt, str):
            raise ValueError("recipients: orcpt must be text")
        recipients.append(NewRecipient(item["address"], orcpt, tuple(notify)))
    body_type = text("body_type", optional=False)
    if body_type not in ("7BIT", "8BITMIME"):
        raise ValueError("body_type: expected 7BIT or 8BITMIME")
    ret = text("ret")
    if ret not in (None, "FULL", "HDRS"):
        raise ValueError("ret: expected FULL or HDRS")
    return Drop(
        recipients=tuple(recipients), body=data[end + 1:], sender=text("sender"),
        full_name=text("full_name") or "", envid=text("envid"), ret=ret, body_type=body_type,
        smtputf8=env.get("smtputf8") is True,
    )


def write(directory: str, drop: Drop, name: str | None = None) -> str:
    """Leave drop in directory, durably; return the file's name.  Raises OSError (nothing is
    left behind then)."""
    name = name or new_name()
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        data = memoryview(encode(drop))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
        # Ready only once the content is on disk: the daemon skips files without the mark.
        os.fchmod(fd, FILE_MODE | READY_BIT)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    return name
