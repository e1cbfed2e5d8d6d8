"""Logging: one grep-able line per event, keyed by queue ID.

Text lines look like `2026-11-24 14:50:35,120 elemta[812]: 01JD3W5K8Q0G8 queued size=5120
nrcpt=1` or, before a queue ID exists, `... NOQUEUE connect ip=192.0.2.1 conn=7`;
`format = "json"` gives one JSON object per line.  Values are quoted when they hold spaces or
quotes, and client-supplied text is cut short by the callers, so a hostile client cannot forge
or flood log lines.

Lines go to standard error (journald adds the unit under systemd).  When standard error is
the journal's stream (JOURNAL_STREAM names it, systemd.exec(5)), a text line starts with the
syslog priority, `<4>` for a warning, instead of the time, which the journal records itself:
`journalctl -p warning` then finds elemta's warnings, and no line carries two timestamps.  A daemon writes them from
one background thread in batches: a session thread only appends a line to a list.  Writing
each line itself cost a system call, and a fight for the GIL, per line: with info logging
that was a third of elemta's CPU per message in bench/accept.py.  The price is that a line
can reach the log up to FLUSH_INTERVAL after its event, and a kill -9 loses those lines.
"""

from __future__ import annotations

import collections
import json
import os
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


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=True)
    return text


class _Clock:
    """Timestamps like logging's asctime, with the per-second part formatted once a second."""

    def __init__(self):
        self._second = -1
        self._text = ""

    def stamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # a race here only formats the same second twice
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._text},{int((now - second) * 1000):03d}"


class BatchWriter:
    """Writes lines to a stream from one background thread, every FLUSH_INTERVAL."""

    def __init__(self, stream):
        self.stream = stream
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
                self.stream.flush()
            except (OSError, ValueError):
                pass  # nowhere left to say it; never take the daemon down for its log

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class EventLog:
    """log(event, qid=..., level=WARNING, key=value...) records one line; cheap to call."""

    def __init__(self, level: str = "info", json_format: bool = False, sink=None):
        self.sink = sink or self._write_now
        self._clock = _Clock()
        self._pid = os.getpid()
        self._journal = to_journal()
        self.configure(level, json_format)

    def configure(self, level: str, json_format: bool) -> None:
        """Set the threshold and the format (a reload may change them)."""
        self.level = LEVELS[level]
        self.json_format = json_format

    @staticmethod
    def _write_now(line: str) -> None:
        sys.stderr.write(line)
        sys.stderr.flush()

    def __call__(self, event: str, qid: str | None = None, level: int = INFO, **fields) -> None:
        if level < self.level:
            return
        now = time.time()
        if self.json_format:
            record = {"time": round(now, 3), "qid": qid, "event": event}
            record.update((k.rstrip("_"), v) for k, v in fields.items())
            line = json.dumps(record, default=str)
        else:
            name = f"elemta[{self._pid}]:"
            first = f"<{_syslog_priority(level)}>{name}" if self._journal else f"{self._clock.stamp(now)} {name}"
            parts = [first, qid or "NOQUEUE", event]
            parts += [f"{k.rstrip('_')}={_quote(v)}" for k, v in fields.items()]
            line = " ".join(parts)
        self.sink(line + "\n")

    def exception(self, event: str, **fields) -> None:
        """An ERROR event for the exception being handled, then its traceback."""
        if self.json_format:
            self(event, level=ERROR, traceback=traceback.format_exc(), **fields)
            return
        self(event, level=ERROR, **fields)
        if self.level <= ERROR:
            self.sink(traceback.format_exc())
