"""log.py: line format, levels, JSON, and the batched writer."""

from __future__ import annotations

import io
import json
import os
import re

from elemta import log
from tests.support import ROOT


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


def test_on_the_journal_stream_lines_carry_the_priority_not_the_time(tmp_path):
    """Under systemd, JOURNAL_STREAM names standard error's device:inode (systemd.exec(5))."""
    import subprocess
    import sys

    stream = tmp_path / "journal"
    with open(stream, "wb") as err:
        st = os.fstat(err.fileno())
        code = ("from elemta import log; l = log.EventLog(); l('started', a=1); "
                "l('trouble', level=log.WARNING); l('broken', qid='Q1', level=log.ERROR)")
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, timeout=30, check=True)
    lines = stream.read_text().splitlines()
    assert [line.split(" ", 1)[0][:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert re.fullmatch(r"<6>elemta\[\d+\]: NOQUEUE started a=1", lines[0])
    assert lines[2].endswith(": Q1 broken")
    assert not log.to_journal({"JOURNAL_STREAM": "1:2"})  # another stream: the usual lines
    assert not log.to_journal({})
