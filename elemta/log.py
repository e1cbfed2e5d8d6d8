"""Logging: one grep-able line per event, keyed by queue ID.

Text lines look like `2026-11-24T14:50:35.120+01:00 elemta[812]: 01JD3W5K8Q0G8 queued
size=5120 nrcpt=1` (ISO 8601, local time with its offset) or, before a queue ID exists,
`... NOQUEUE connect ip=192.0.2.1 conn=7`; `format = "json"` gives one JSON object per line.
Values are quoted when they hold spaces or quotes, and client-supplied text is cut short by the
callers, so a hostile client cannot forge or flood log lines. A traceback follows its event
line by line, each with the same prefix and `|`, so one grep of the queue ID finds it too.

Where lines go is `log.target`: standard error (the default; journald adds the unit under
systemd), a file (`log.file`, reopened on SIGHUP and SIGUSR1 for logrotate), or syslog through
/dev/log with `log.facility` (mail by default, as MTAs log, so fail2ban and logwatch find
elemta where they look for Postfix). When standard error is the journal's stream
(JOURNAL_STREAM names it, systemd.exec(5)), a text line starts with the syslog priority, `<4>`
for a warning, instead of the time, which the journal records itself: `journalctl -p warning`
then finds elemta's warnings, and no line carries two timestamps.  A daemon writes them from
one background thread in batches: a session thread only appends a line to a list.  Writing
each line itself cost a system call, and a fight for the GIL, per line: with info logging
that was a third of elemta's CPU per message in bench/accept.py.  The price is that a line
can reach the log up to FLUSH_INTERVAL after its event, and a kill -9 loses those lines.
"""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import sys
import threading
import time
import traceback

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
FLUSH_INTERVAL = 0.05  # seconds between batched writes
MAX_PENDING = 100_000  # lines held for a stream that does not keep up; past it, lines are counted and dropped


def _syslog_priority(level: int) -> int:
    """RFC 5424 §6.2.1: debug 7, informational 6, warning 4, error 3."""
    return 7 if level < INFO else 6 if level < WARNING else 4 if level < ERROR else 3


def to_journal(environ=None) -> bool:
    """Whether standard error is the journal's stream: JOURNAL_STREAM holds its device:inode."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


_NEEDS_QUOTES = re.compile(r'[ "=\\]')
_PLAIN = re.compile(r'[!#-<>-\[\]-~]+')  # printable ASCII but space, '"', '=' and '\\': as it is


def _quote(value: object) -> str:
    if type(value) is int:  # digits and a sign: never quoted
        return str(value)
    text = value if type(value) is str else str(value)
    if _PLAIN.fullmatch(text):  # the common case, in one look
        return text
    if not text or _NEEDS_QUOTES.search(text) or not text.isprintable():
        return json.dumps(text, ensure_ascii=True)
    return text  # printable non-ASCII: as it is


_FIELD_NAMES: dict[str, str] = {}  # "from_" -> "from=": the names are the code's own, a few dozen


def _field_name(key: str) -> str:
    name = _FIELD_NAMES.get(key)
    if name is None:
        name = key.rstrip("_") + "="
        if len(_FIELD_NAMES) < 1024:  # a plugin's own names too, but never without bound
            _FIELD_NAMES[key] = name
    return name


FACILITIES = {"mail": 2, "daemon": 3, **{f"local{n}": 16 + n for n in range(8)}}
SYSLOG_PATH = "/dev/log"


_MILLIS = tuple(f".{n:03d}" for n in range(1000))  # a table: formatting them cost a third of a line


class _Clock:
    """ISO 8601 timestamps with the offset, the per-second part formatted once a second."""

    def __init__(self):
        self._second = -1
        self._text = ""
        self._zone = ""

    def stamp(self, now: float, tail: str = "") -> str:
        """The time of now, then tail."""
        second = int(now)
        if second != self._second:  # a race here only formats the same second twice
            local = time.localtime(second)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", local)
            offset = local.tm_gmtoff // 60
            zone = f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
            self._text, self._zone, self._second = text, zone, second
        return self._text + _MILLIS[int((now - second) * 1000)] + self._zone + tail


class Target:
    """Where lines go, and how each begins: the time (a file, a terminal), the priority (the
    journal), or a syslog header."""

    name = "stderr"

    def __init__(self, ident: str = "elemta"):
        self.ident = ident
        self._clock = _Clock()
        self._tag, self._tag_pid = "", -1
        self._journal = to_journal()

    def prefix(self, level: int, now: float, pid: int) -> str:
        if self._journal:
            return f"<{_syslog_priority(level)}>{self.ident}[{pid}]: "
        if pid != self._tag_pid:  # " elemta[812]: ", made again only after a fork
            self._tag, self._tag_pid = f" {self.ident}[{pid}]: ", pid
        return self._clock.stamp(now, self._tag)

    def write(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def reopen(self) -> None:
        pass


class FileTarget(Target):
    """Appends to a file (0640); reopen() after logrotate moved it away."""

    name = "file"

    def __init__(self, path: str, ident: str = "elemta"):
        super().__init__(ident)
        self._journal = False
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        while data:  # O_APPEND: each write lands whole at the end, whoever else appends
            data = data[os.write(self._fd, data):]

    def reopen(self) -> None:
        fd = self._open()  # OSError: the caller logs it and keeps the old file
        old, self._fd = self._fd, fd
        os.close(old)


class SyslogTarget(Target):
    """One datagram per line to /dev/log (RFC 3164 framing, as syslog(3) sends it)."""

    name = "syslog"

    def __init__(self, facility: str = "mail", ident: str = "elemta", path: str = SYSLOG_PATH):
        super().__init__(ident)
        self.facility = FACILITIES[facility]
        self.path = path
        self._sock = self._connected()  # OSError at start: no syslog daemon to talk to

    def _connected(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def _connect(self) -> None:
        """Connect again (the syslog daemon restarted, or logrotate's reopen)."""
        sock = self._connected()
        self._sock.close()
        self._sock = sock

    def prefix(self, level: int, now: float, pid: int) -> str:
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
        return f"<{self.facility * 8 + _syslog_priority(level)}>{stamp} {self.ident}[{pid}]: "

    def write(self, text: str) -> None:
        for line in text.splitlines():
            data = line.encode("utf-8", "backslashreplace")
            try:
                self._sock.send(data)
            except OSError:  # the syslog daemon restarted: connect again, once
                try:
                    self._connect()
                    self._sock.send(data)
                except OSError:
                    pass  # nowhere left to say it; never take the daemon down for its log

    def reopen(self) -> None:
        self._connect()


def open_target(config, ident: str = "elemta") -> Target:
    """The Target of a [log] table (config.LogConfig); OSError if it cannot be opened."""
    if config.target == "file":
        return FileTarget(config.file, ident)
    if config.target == "syslog":
        return SyslogTarget(config.facility, ident)
    return Target(ident)


class BatchWriter:
    """Writes lines to a stream (or a Target) from one background thread, every FLUSH_INTERVAL."""

    def __init__(self, stream):
        self.stream = stream  # anything with write(text); a file object is also flushed
        self._lines: collections.deque[str] = collections.deque()
        self._dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def __call__(self, line: str) -> None:
        if len(self._lines) < MAX_PENDING:
            self._lines.append(line)  # deque.append is atomic: no lock, no system call
        else:
            self._dropped += 1

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush()
        self.flush()

    def flush(self) -> None:
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            lines.append(f"NOQUEUE log_overflow dropped={dropped}\n")
        if lines:
            try:
                self.stream.write("".join(lines))
                if hasattr(self.stream, "flush"):
                    self.stream.flush()
            except (OSError, ValueError):
                pass  # nowhere left to say it; never take the daemon down for its log

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class EventLog:
    """log(event, qid=..., level=WARNING, key=value...) records one line; cheap to call."""

    def __init__(self, level: str = "info", json_format: bool = False, sink=None, target: Target | None = None):
        """sink(text) receives the lines (a BatchWriter, or a list's append in tests);
        without one they go to target at once. target decides how lines begin."""
        self.target = target or Target()
        self.sink = sink or self.target.write
        self._pid = os.getpid()
        self.configure(level, json_format)

    def configure(self, level: str, json_format: bool) -> None:
        """Set the threshold and the format (a reload may change them)."""
        self.level = LEVELS[level]
        self.json_format = json_format

    def __call__(self, event: str, qid: str | None = None, level: int = INFO, **fields) -> None:
        if level < self.level:
            return
        now = time.time()
        if self.json_format:
            record = {"time": round(now, 3), "qid": qid, "event": event}
            record.update((k.rstrip("_"), v) for k, v in fields.items())
            self.sink(json.dumps(record, default=str) + "\n")
            return
        # Six lines per message at level info: the usual field (an int, or plain text) is
        # written here without a call; _quote() has the rest (bench/instructions.py: -14%).
        parts = [self.target.prefix(level, now, self._pid), qid or "NOQUEUE", " ", event]
        names, plain = _FIELD_NAMES, _PLAIN.fullmatch
        for k, v in fields.items():
            kind = type(v)
            text = str(v) if kind is int else v if kind is str and plain(v) else _quote(v)
            parts += (" ", names.get(k) or _field_name(k), text)
        parts.append("\n")
        self.sink("".join(parts))

    def exception(self, event: str, qid: str | None = None, error: BaseException | None = None, **fields) -> None:
        """An ERROR event for the exception being handled (or error), then its traceback, each
        line with the event's prefix and queue ID (one grep finds it; syslog gets it line by line)."""
        text = "".join(traceback.format_exception(error)) if error is not None else traceback.format_exc()
        if self.json_format:
            self(event, qid=qid, level=ERROR, traceback=text, **fields)
            return
        self(event, qid=qid, level=ERROR, **fields)
        if self.level <= ERROR:
            first = self.target.prefix(ERROR, time.time(), self._pid) + (qid or "NOQUEUE") + " | "
            self.sink("".join(first + line + "\n" for line in text.rstrip("\n").split("\n")))
