"""log.py: line format, levels, JSON, and the batched writer."""

from __future__ import annotations

import io
import json
import re

from elemta import log


def test_text_line_format_and_quoting():
    lines: list[str] = []
    events = log.EventLog(sink=lines.append)
    events("mail", qid="1K10R229FHC00", sender="<a@b.example>", helo="two words", empty="")
    events("connect", ip="192.0.2.1")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} elemta\[\d+\]: 1K10R229FHC00 mail "
        r'sender=<a@b.example> helo="two words" empty=""\n',
        lines[0],
    )
    assert lines[1].endswith(" NOQUEUE connect ip=192.0.2.1\n")


def test_levels_and_reconfigure():
    lines: list[str] = []
    events = log.EventLog("warning", sink=lines.append)
    events("connect")
    events("queue_error", level=log.WARNING, error="disk")
    assert len(lines) == 1 and "queue_error error=disk" in lines[0]
    events.configure("info", json_format=True)
    events("connect", ip="::1")
    record = json.loads(lines[1])
    assert record["event"] == "connect" and record["ip"] == "::1" and record["qid"] is None


def test_exception_in_json_stays_one_line():
    lines: list[str] = []
    events = log.EventLog(json_format=True, sink=lines.append)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        events.exception("internal_error", conn=3)
    [line] = lines
    assert "RuntimeError: boom" in json.loads(line)["traceback"]


def test_batch_writer_flushes_everything_on_close():
    stream = io.StringIO()
    writer = log.BatchWriter(stream)
    events = log.EventLog(sink=writer)
    for n in range(1000):
        events("rcpt", qid="Q", n=n)
    writer.close()
    written = stream.getvalue().splitlines()
    assert len(written) == 1000 and written[-1].endswith("Q rcpt n=999")
