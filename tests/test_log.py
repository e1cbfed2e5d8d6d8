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
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d elemta\[\d+\]: 1K10R229FHC00 mail "
        r'sender=<a@b.example> helo="two words" empty=""\n',
        lines[0],
    )
    assert lines[1].endswith(" NOQUEUE connect ip=192.0.2.1\n")


def test_a_value_is_quoted_exactly_when_it_must_be():
    def slow_rule(text: str) -> str:  # the rule as the log format states it
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            return json.dumps(text, ensure_ascii=True)
        return text

    samples = ["plain", "a@b.example", "<a@b.example>", "[192.0.2.1]", "two words", "k=v", 'say "hi"',
               "back\\slash", "", "caf\u00e9", "tab\there", "\x01", "~{|}!#$%&'()*+,-./:;<>?@[]^_`"]
    samples += [chr(c) for c in range(0, 256)]
    for text in samples:
        assert log._quote(text) == slow_rule(text), repr(text)
    assert log._quote(42) == "42" and log._quote(-1) == "-1" and log._quote(True) == "True"
    assert log._quote(None) == "None" and log._quote(0.25) == "0.25"
    lines: list[str] = []
    log.EventLog(sink=lines.append)("x", from_="<a@b>", class_=3)
    assert lines[0].endswith(" NOQUEUE x from=<a@b> class=3\n")


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


def test_timestamps_carry_the_offset_of_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # +05:30: an offset with minutes
    import time as time_module

    time_module.tzset()
    try:
        lines: list[str] = []
        log.EventLog(sink=lines.append)("connect")
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+05:30 elemta\[", lines[0]), lines[0]
    finally:
        monkeypatch.delenv("TZ")
        time_module.tzset()


def test_the_milliseconds_are_cut_not_rounded_and_the_pid_is_the_callers(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    import time as time_module

    time_module.tzset()
    try:
        target = log.Target()
        target._journal = False
        assert target.prefix(log.INFO, 1700000000.0, 7) == "2023-11-14T22:13:20.000+00:00 elemta[7]: "
        assert target.prefix(log.INFO, 1700000000.9999, 7) == "2023-11-14T22:13:20.999+00:00 elemta[7]: "
        assert target.prefix(log.INFO, 1700000001.042, 8) == "2023-11-14T22:13:21.042+00:00 elemta[8]: "  # after a fork
        assert target.prefix(log.INFO, 1700000000.5, 7) == "2023-11-14T22:13:20.500+00:00 elemta[7]: "  # a second back
    finally:
        monkeypatch.delenv("TZ")
        time_module.tzset()


def test_a_traceback_keeps_the_prefix_and_queue_id_on_every_line():
    lines: list[str] = []
    events = log.EventLog(sink=lines.append)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        events.exception("internal_error", qid="1K10R229FHC00", conn=3)
    text = "".join(lines).splitlines()
    assert len(text) > 3 and all(" elemta[" in line and " 1K10R229FHC00 " in line for line in text)
    assert text[-1].endswith("1K10R229FHC00 | RuntimeError: boom")


def test_the_file_target_appends_and_reopens_after_a_rotation(tmp_path):
    path = tmp_path / "elemta.log"
    target = log.FileTarget(str(path))
    events = log.EventLog(target=target)
    events("first")
    path.rename(tmp_path / "elemta.log.1")  # what logrotate does, before it signals
    events("second")  # still into the moved file, as any daemon until it reopens
    target.reopen()
    events("third")
    assert [ln.split()[-1] for ln in (tmp_path / "elemta.log.1").read_text().splitlines()] == ["first", "second"]
    assert path.read_text().endswith("NOQUEUE third\n")
    assert path.stat().st_mode & 0o777 == 0o640


DAEMON_CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"
workers = 2

[smtp]
local_domains = ["example.com"]

[delivery]
hold = true

[queue]
min_free_space = 0

[log]
target = "file"
file = "@LOG@"
"""


def test_every_process_reopens_the_file_on_sigusr1(tmp_path):
    import signal
    import smtplib

    from tests.support import Daemon, wait_for

    path = tmp_path / "elemta.log"
    daemon = Daemon(tmp_path, DAEMON_CONFIG.replace("@LOG@", str(path))).start()
    try:
        wait_for(lambda: path.exists() and "supervising" in path.read_text(), 10, what="the log file")
        assert daemon.stderr == []  # nothing on stderr: it all went to the file
        path.rename(tmp_path / "elemta.log.1")
        daemon.signal(signal.SIGUSR1)
        wait_for(path.exists, 10, what="the supervisor to open a new file")
        # The kernel hashes each connection to a worker: six of them all went to one worker once
        # in 32 runs, so rounds of six are sent until both workers have logged (or ten rounds).
        sent, pids = 0, set()
        while len(pids) < 2 and sent < 60:
            for _ in range(6):
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                    client.sendmail("a@example.org", ["b@example.com"], f"Subject: {sent}\r\n\r\nhi\r\n")
                sent += 1
            wait_for(lambda n=sent: path.read_text().count(" queued ") == n, 10, what=f"{sent} queued lines in the new file")
            pids = {re.search(r"elemta\[(\d+)\]", line).group(1) for line in path.read_text().splitlines()
                    if " queued " in line}
        assert len(pids) == 2, "both workers write to the new file"
        assert " queued " not in (tmp_path / "elemta.log.1").read_text()
    finally:
        daemon.stop()


def test_the_syslog_target_sends_one_datagram_per_line_with_facility_mail(tmp_path):
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "dev-log"))
    server.settimeout(5)
    try:
        target = log.SyslogTarget("mail", path=str(tmp_path / "dev-log"))
        events = log.EventLog(target=target)
        events("queued", qid="1K10R229FHC00", size=5)
        events("queue_error", level=log.WARNING, error="disk full")
        first, second = server.recv(4096).decode(), server.recv(4096).decode()
    finally:
        server.close()
    # PRI = facility mail (2) * 8 + severity: info 6 = <22>, warning 4 = <20>; then an RFC 3164 time.
    assert re.fullmatch(r"<22>[A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d elemta\[\d+\]: 1K10R229FHC00 queued size=5", first)
    assert second.startswith("<20>") and second.endswith("queue_error error=\"disk full\"")
