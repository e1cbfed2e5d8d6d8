"""cli/audit.py: elemtactl's changes to the queue land in the daemon's log, with the admin."""

from __future__ import annotations

import re
import smtplib
import subprocess
from pathlib import Path

from tests.support import Daemon, wait_for

ELEMTACTL = Path(__file__).resolve().parent.parent.parent / "bin" / "elemtactl"

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"

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


def test_holds_releases_and_flushes_are_logged_with_the_admin(tmp_path):
    log = tmp_path / "elemta.log"
    daemon = Daemon(tmp_path, CONFIG.replace("@LOG@", str(log))).start()
    try:
        for n in range(2):
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.sendmail("a@example.org", ["b@example.com"], f"Subject: {n}\r\n\r\nhi\r\n")
        wait_for(lambda: log.read_text().count(" queued ") == 2, 10, what="two queued lines")
        first, second = (m["queue_id"] for m in daemon.messages())

        def ctl(*args: str) -> None:
            done = subprocess.run([str(ELEMTACTL), "--config", str(daemon.config_path), *args],
                                  capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
                                  check=False)
            assert done.returncode == 0, done.stderr
            assert "warning" not in done.stderr

        # Hold before release: once released, delivery may take the message at once, and a
        # hold of a message being delivered is logged as skipped (a race, not the point here).
        ctl("queue", "hold", first)
        ctl("queue", "release", first)
        ctl("queue", "priority", second, "high")
        ctl("queue", "flush", "example.com")
        text = log.read_text()
    finally:
        daemon.stop()
    assert re.search(rf"elemtactl\[\d+\]: {first} admin_hold user=root\n", text)
    assert re.search(rf"elemtactl\[\d+\]: {first} admin_release user=root\n", text)
    assert re.search(rf"elemtactl\[\d+\]: {second} admin_priority user=root priority=high\n", text)
    assert re.search(r"elemtactl\[\d+\]: NOQUEUE admin_flush user=root messages=\d+ recipients=\d+ domain=example.com\n", text)
    # One grep of the queue ID: the daemon's lines and the admin's, in one place.
    events = [ln.split(": ", 1)[1].split()[1] for ln in text.splitlines() if f" {first} " in ln]
    assert events[0] == "mail" and events.index("admin_hold") < events.index("admin_release"), events
