"""Plugins in the real daemon: every verdict reaches the client or the queue, a plugin's
failure or hang stays its own (fail-open or 451), and elemtactl plugins shows the counts.

The plugins are tests/plugins/sample.py, loaded by module path as a site's own would be.
"""

from __future__ import annotations

import json
import smtplib
import subprocess

import pytest

from tests.plugins.sample import RELEASE
from tests.support import ROOT, Daemon, RawClient, wait_for

ELEMTACTL = ROOT / "bin" / "elemtactl"
S = "tests.plugins.sample:"

BASE = """
[server]
spool_dir = "@SPOOL@"
hostname = "mx.test"
[smtp]
local_domains = ["example.test"]
trusted_networks = []
authserv_id = "mx.test"
[delivery]
hold = true
[limits]
ip_connections_per_minute = 0
[[listeners]]
address = "127.0.0.1:0"
role = "mx"
"""

MESSAGE = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


def plugin(use, **settings):
    options = settings.pop("options", {})
    lines = ["[[plugins]]", f'use = "{use}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    if options:
        lines.append("[plugins.options]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture()
def daemon_with(tmp_path):
    started = []

    def start(*plugins: str) -> Daemon:
        daemon = Daemon(tmp_path / f"d{len(started)}", BASE + "".join(plugins)).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def send(daemon, rcpts=("b@example.test",), message=MESSAGE):
    with smtplib.SMTP("127.0.0.1", daemon.ports["mx"], timeout=10) as client:
        return client.sendmail("a@sender.test", list(rcpts), message)


def only_message(daemon):
    rows = wait_for(daemon.messages, what="a queued message")
    assert len(rows) == 1
    return rows[0]


def ctl_plugins(daemon) -> dict:
    out = subprocess.run([str(ELEMTACTL), "--config", str(daemon.config_path), "plugins", "--json"], check=False,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {p["name"]: p for p in json.loads(out.stdout)["plugins"]}


def test_headers_auth_results_and_priority_reach_the_queue(daemon_with):
    daemon = daemon_with(plugin(S + "Tagger"))
    send(daemon)
    row = only_message(daemon)
    body = daemon.body(row["queue_id"])
    header = body.split(b"\r\n\r\n")[0]
    assert header.startswith(b"Received: ")
    assert b"\r\nAuthentication-Results: mx.test;\r\n\tx-tagger=pass;\r\n\tx-seen=1\r\n" in header
    assert b"\r\nX-Tagged: by tagger\r\n" in header
    assert body.endswith(MESSAGE)
    assert row["priority"] == 1  # high


def test_a_plugin_rejects_one_recipient_and_the_others_go_through(daemon_with):
    daemon = daemon_with(plugin(S + "Tagger", options={"reject_rcpt": "bad@example.test"}))
    refused = send(daemon, rcpts=("bad@example.test", "b@example.test"))
    assert refused == {"bad@example.test": (550, b"5.7.1 tagger refuses bad@example.test")}
    assert [r["address"] for r in daemon.recipients(only_message(daemon)["queue_id"])] == ["b@example.test"]
    line = wait_for(lambda: [x for x in daemon.log_text().splitlines() if " plugin_verdict " in x],
                    what="the verdict in the log")[0]
    assert "plugin=tagger" in line and "hook=on_rcpt_to" in line and 'reply="550 5.7.1"' in line


@pytest.mark.parametrize("use, settings", [
    ("Raises", {}),
    ("Hangs", {"timeout": 0.3}),
    ("Garbage", {}),
])
def test_a_broken_fail_open_plugin_is_skipped(daemon_with, use, settings):
    daemon = daemon_with(plugin(S + use, **settings), plugin(S + "Tagger"))
    send(daemon)
    body = daemon.body(only_message(daemon)["queue_id"])
    assert b"X-Tagged: by tagger" in body  # the plugin after the broken one ran
    name = use.lower()
    def counted():  # the stats file is rewritten every few seconds: wait for one after the call
        counts = (ctl_plugins(daemon).get(name) or {}).get("hooks", {}).get("on_mail_from")
        return counts if counts and counts["calls"] >= 1 else None

    counts = wait_for(counted, what="plugin statistics counting the call")
    assert counts["errors"] + counts["timeouts"] >= 1
    RELEASE.set()


@pytest.mark.parametrize("hook", ["on_mail_from", "on_message"])
def test_a_hung_fail_closed_plugin_gives_451(daemon_with, hook):
    daemon = daemon_with(plugin(S + "Hangs", timeout=0.3, fail_closed=True, options={"hook": hook}))
    with RawClient("127.0.0.1", daemon.ports["mx"]) as client:
        client.cmd("EHLO client.test")
        reply = client.cmd("MAIL FROM:<a@sender.test>")
        if hook == "on_message":
            assert reply[0] == 250
            assert client.cmd("RCPT TO:<b@example.test>")[0] == 250
            assert client.cmd("DATA")[0] == 354
            reply = client.cmd(MESSAGE + b".\r\n")
        assert reply == (451, "4.3.0 Temporary local problem, please try again later")
        assert client.cmd("NOOP")[0] == 250  # the session goes on
    assert daemon.messages() == []


def test_a_failing_fail_closed_plugin_at_connect_gives_421(daemon_with):
    daemon = daemon_with(plugin(S + "Raises", fail_closed=True))
    with RawClient("127.0.0.1", daemon.ports["mx"]) as client:
        assert client.greeting == (421, "4.3.0 mx.test Temporary local problem, please try again later")
        assert client.closed_by_server()


def test_a_plugin_exception_at_connect_does_not_cost_the_session(daemon_with):
    daemon = daemon_with(plugin(S + "Raises"))
    with RawClient("127.0.0.1", daemon.ports["mx"]) as client:
        assert client.greeting[0] == 220


def test_a_rejected_connection_gets_554_and_then_only_quit(daemon_with):
    daemon = daemon_with(plugin(S + "Gate", options={"connect": "reject"}))
    with RawClient("127.0.0.1", daemon.ports["mx"]) as client:
        assert client.greeting == (554, "5.7.1 No SMTP service for 127.0.0.1")
        assert client.cmd("EHLO client.test")[0] == 503
        assert client.cmd("MAIL FROM:<a@sender.test>")[0] == 503
        assert client.cmd("QUIT")[0] == 221


def test_a_deferred_connection_gets_421_and_is_closed(daemon_with):
    daemon = daemon_with(plugin(S + "Gate", options={"connect": "defer"}))
    with RawClient("127.0.0.1", daemon.ports["mx"]) as client:
        assert client.greeting == (421, "4.7.0 mx.test Come back later")
        assert client.closed_by_server()


def test_quarantine_holds_the_message(daemon_with):
    daemon = daemon_with(plugin(S + "Gate", options={"message": "quarantine"}))
    send(daemon)
    assert [r["state"] for r in daemon.recipients(only_message(daemon)["queue_id"])] == ["held"]
    wait_for(lambda: "quarantined" in daemon.log_text() and 'reason="looks odd"' in daemon.log_text(),
             what="the quarantine in the log")


def test_discard_answers_250_and_queues_nothing(daemon_with):
    daemon = daemon_with(plugin(S + "Gate", options={"message": "discard"}))
    assert send(daemon) == {}
    wait_for(lambda: " discarded " in daemon.log_text(), what="the discard in the log")
    assert daemon.messages() == []


def test_forged_authentication_results_with_our_id_are_removed_and_others_kept(daemon_with):
    daemon = daemon_with(plugin(S + "Gate", options={"message": "strip"}))
    forged = (b"Authentication-Results: MX.test; spf=pass smtp.mailfrom=forged.test\r\n"
              b"Authentication-Results: other.test;\r\n dkim=pass header.d=other.test\r\n"
              b"X-Secret: internal\r\n")
    send(daemon, message=forged + MESSAGE)
    body = daemon.body(only_message(daemon)["queue_id"])
    assert b"forged.test" not in body and b"X-Secret" not in body
    assert b"Authentication-Results: other.test;\r\n dkim=pass header.d=other.test\r\n" in body


def test_elemtactl_plugins_on_a_daemon_without_plugins_says_none_are_loaded(daemon_with):
    daemon = daemon_with()

    def said():
        out = subprocess.run([str(ELEMTACTL), "--config", str(daemon.config_path), "plugins"],
                             capture_output=True, text=True, timeout=30, check=False)
        return out.returncode == 0 and "No plugins are loaded." in out.stdout + out.stderr
    wait_for(said, what="elemtactl plugins to see the running daemon")
