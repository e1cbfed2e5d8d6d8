"""End to end: bin/elemtactl as a subprocess against the running daemon's queue, mail sent with
smtplib, delivery to a loopback MX (tests/mx.py) found through loopback DNS."""

from __future__ import annotations

import json
import smtplib
import subprocess

import pytest

from tests.dnsserver import DnsServer
from tests.mx import Mx
from tests.support import ROOT, Daemon, wait_for

ELEMTACTL = ROOT / "bin" / "elemtactl"

# Retries an hour apart: a deferred message stays deferred unless elemtactl makes it due.
CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "relay.test"
grace_period = 5

[queue]
min_free_space = 0

[delivery]
resolvers = ["{dns}"]
mx_port = {mx_port}
dns_timeout = 2
retry_first = 3600
retry_max = 3600
retry_jitter = 0
delay_warning = 0
"""


@pytest.fixture
def mx():
    with Mx() as server:
        yield server


@pytest.fixture
def daemon(tmp_path, mx):
    zone = {"remote.test": [("MX", (10, "mx.remote.test"), 300)], "mx.remote.test": [("A", "127.0.0.1", 300)]}
    with DnsServer(zone) as dns:
        started = Daemon(tmp_path, CONFIG.format(dns=dns.nameserver, mx_port=mx.port)).start()
        yield started
        started.stop()


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(ELEMTACTL), "--config", str(daemon.config_path), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    return done


def listed(daemon: Daemon, *args: str) -> dict[str, dict[str, str]]:
    """queue ID -> {recipient: state}, as elemtactl lists them."""
    page = json.loads(ctl(daemon, "queue", "list", "--json", *args).stdout)
    return {m["queue_id"]: {r["address"]: r["state"] for r in m["recipients"]} for m in page["messages"]}


def send(daemon: Daemon, rcpt: str) -> str:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@sender.test")[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(b"Subject: e2e\r\n\r\nHello.\r\n")
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]  # 250 2.0.0 Ok: queued as <ID>


def deferred(daemon: Daemon, mx: Mx, rcpt: str) -> str:
    """A message whose first attempt got a 451: it waits an hour for the next."""
    mx.handler.script(rcpt, "451 4.3.0 try again later")
    qid = send(daemon, rcpt)
    wait_for(lambda: listed(daemon, "--state", "deferred").get(qid) == {rcpt: "deferred"}, 15,
             what=f"{rcpt} deferred")
    return qid


def test_hold_release_flush_and_delete_a_running_daemons_mail(daemon, mx):
    held = deferred(daemon, mx, "bob@remote.test")
    assert ctl(daemon, "queue", "hold", held).stdout == "held 1 message (1 recipient)\n"
    assert listed(daemon, "--state", "held") == {held: {"bob@remote.test": "held"}}

    # Released: due now, and the daemon, which was waiting an hour, delivers it at once.
    assert ctl(daemon, "queue", "release", held).stdout == "released 1 message (1 recipient)\n"
    wait_for(lambda: mx.handler.to("bob@remote.test"), 10, what="delivery after release")
    wait_for(lambda: listed(daemon) == {}, 10, what="an empty queue")

    flushed = deferred(daemon, mx, "carol@remote.test")
    assert json.loads(ctl(daemon, "queue", "flush", "--json", "remote.test").stdout)["recipients"] == 1
    wait_for(lambda: mx.handler.to("carol@remote.test"), 10, what="delivery after flush")
    trace = json.loads(ctl(daemon, "queue", "trace", "--json", flushed).stdout)
    assert [t["outcome"] for t in trace["recipients"][0]["tries"]] == ["deferred", "delivered"]

    doomed = deferred(daemon, mx, "dave@remote.test")
    assert ctl(daemon, "queue", "delete", doomed).stdout == "deleted 1 message (1 recipient)\n"
    assert listed(daemon) == {}
    assert daemon.messages()[-1]["queue_id"] != doomed
    ctl(daemon, "queue", "flush")
    assert not mx.handler.to("dave@remote.test")
