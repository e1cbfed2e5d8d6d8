"""Logging: one grep-able line per event, keyed by queue ID.

Text lines look like `01JD3W5K8Q0G8 queued size=5120 nrcpt=1` or, before a queue ID exists,
`NOQUEUE connect ip=192.0.2.1 conn=7`; `format = "json"` gives one JSON object per line.
Values are quoted when they hold spaces or quotes, and client-supplied text is cut short by
the callers, so a hostile client cannot forge or flood log lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER_NAME = "elemta"


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=True)
    return text


class EventLog:
    """log(event, qid=..., key=value...) writes one line; the object is cheap to call."""

    def __init__(self, logger: logging.Logger | None = None, json_format: bool = False):
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.json_format = json_format

    def __call__(self, event: str, qid: str | None = None, level: int = logging.INFO, **fields) -> None:
        if not self.logger.isEnabledFor(level):
            return
        if self.json_format:
            record = {"time": round(time.time(), 3), "qid": qid, "event": event}
            record.update((k.rstrip("_"), v) for k, v in fields.items())
            line = json.dumps(record, default=str)
        else:
            parts = [qid or "NOQUEUE", event]
            parts += [f"{k.rstrip('_')}={_quote(v)}" for k, v in fields.items()]
            line = " ".join(parts)
        self.logger.log(level, line)


def setup(level: str = "info", stream=None, json_format: bool = False) -> logging.Logger:
    """Send elemta's log lines to stderr (journald adds time and unit under systemd).

    JSON lines carry their own time and are written bare, so each line parses as JSON.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    fmt = "%(message)s" if json_format else "%(asctime)s elemta[%(process)d]: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger
