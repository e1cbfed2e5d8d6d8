"""monitor.py and metrics.py end to end: the real daemon with two SMTP workers, its /metrics
scraped by a real Prometheus and checked by promtool, /healthz and /readyz as the processes
and the spool fail and recover."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from elemta import config as cfg
from elemta import monitor
from tests.support import Daemon, from_readable_copy, wait_for

CONFIG = """
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

[monitor]
listen = "127.0.0.1:0"

[[plugins]]
use = "ratelimit"

[plugins.options]
rules = [{key = "sender", limit = 1000, window = 3600, count = "messages"}]
"""

MONITOR_LINE = re.compile(r"^elemta: monitor on (http://[0-9.]+:\d+)/$")


def endpoint(daemon: Daemon) -> str:
    wait_for(lambda: any(MONITOR_LINE.match(line) for line in daemon.stdout), 10, what="the monitor line")
    return next(MONITOR_LINE.match(line).group(1) for line in daemon.stdout if MONITOR_LINE.match(line))


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str, name: str) -> dict[str, float]:
    """{label text: value} of one metric in an exposition."""
    found = {}
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            key, _, value = line.rpartition(" ")
            found[key[len(name):]] = float(value)
    return found


def counters_of(daemon: Daemon) -> Path:
    """The daemon's metrics directory, found as the daemon finds it."""
    return Path(monitor.metrics_dir(cfg.load(str(daemon.config_path))))


def send(port: int, count: int) -> None:
    for n in range(count):  # one connection each: the kernel spreads them over both workers
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as client:
            client.sendmail("a@example.org", ["b@example.com"], f"Subject: {n}\r\n\r\nhello\r\n")


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, CONFIG).start()
    yield d
    d.stop()


def test_metrics_of_every_worker_are_summed_in_one_scrape(daemon):
    url = endpoint(daemon)
    send(daemon.port, 40)
    # Each process applies its counts every half second (metrics.FLUSH_INTERVAL).
    wait_for(lambda: sum(samples(get(url + "/metrics")[1], "elemta_smtp_messages_total").values()) == 40,
             10, what="40 accepted messages counted")
    status, text = get(url + "/metrics")
    assert status == 200
    assert samples(text, "elemta_queue_recipients")['{state="held"}'] == 40
    assert samples(text, "elemta_queue_messages")['{priority="normal"}'] == 40
    assert samples(text, "elemta_smtp_replies_total")['{class="2xx",command="RCPT"}'] == 40
    assert samples(text, "elemta_queue_commit_batch_messages_sum")[""] == 40  # every message committed once
    calls = samples(text, "elemta_plugin_calls_total")
    assert calls['{hook="on_mail_from",plugin="ratelimit",verdict="continue"}'] == 40, calls
    # Each worker wrote its own file: the sum above is over processes, not one worker's view.
    pids = {p["pid"] for p in json.loads((daemon.spool / "monitor" / "status.json").read_text())["children"]
            if p["role"] == "smtp"}
    counting = {int(f.stem.split("_")[-1]) for f in counters_of(daemon).glob("counter_*.db")}
    assert pids <= counting, "both workers took connections"


def test_a_scrape_passes_promtool_and_labels_are_bounded(daemon, tmp_path):
    url = endpoint(daemon)
    send(daemon.port, 3)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.docmd("RCPT TO:<x@example.com>")[0] == 503
        assert client.docmd("MAIL FROM:<a@example.org>")[0] == 250
        client.docmd("RCPT TO:<nobody@elsewhere.example>")  # relay denied: a 5xx with its reason
    text = wait_for(lambda: (t := get(url + "/metrics")[1]) and
                    any("RCPT" in key for key in samples(t, "elemta_smtp_rejections_total")) and t,
                    10, what="the rejections counted")
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # No label value is a queue ID, an address or a client's domain.
    values = set(re.findall(r'="([^"]*)"', text))
    assert values and not [v for v in values if re.search(r"example\.|elsewhere|@|^[0-9A-Z]{13}$", v)], values


def test_the_files_are_private_to_the_service(daemon):
    endpoint(daemon)
    send(daemon.port, 1)
    monitor_dir, counters = daemon.spool / "monitor", counters_of(daemon)
    assert str(counters).startswith("/dev/shm/elemta-0-"), "in memory, one per user and spool"
    assert stat.S_IMODE(monitor_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE(counters.stat().st_mode) == 0o700
    for path in [monitor_dir / "status.json", *counters.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, path
    daemon.stop()
    assert not counters.exists(), "removed at the stop"


def test_a_metrics_directory_others_may_write_stops_the_start(tmp_path):
    counters = tmp_path / "counters"
    counters.mkdir(mode=0o777)
    counters.chmod(0o777)
    d = Daemon(tmp_path, CONFIG.replace('listen = "127.0.0.1:0"',
                                        f'listen = "127.0.0.1:0"\nmetrics_dir = "{counters}"'))
    with pytest.raises(AssertionError, match="exited 78"):
        d.start()
    assert "monitor.metrics_dir:" in d.log_text() and "mode 0777" in d.log_text()


def test_readiness_follows_the_delivery_process(daemon):
    url = endpoint(daemon)
    assert get(url + "/healthz")[0] == 200 and get(url + "/readyz") == (200, '{"status": "ok"}\n')
    supervisor = daemon.proc.pid
    status = json.loads((daemon.spool / "monitor" / "status.json").read_text())
    delivery = next(p["pid"] for p in status["children"] if p["role"] == "delivery")
    os.kill(supervisor, signal.SIGSTOP)  # so it cannot start a new one at once
    try:
        os.kill(delivery, signal.SIGKILL)
        wait_for(lambda: get(url + "/readyz")[0] == 503, 10, what="/readyz to say 503")
        _, body = get(url + "/readyz")
        problems = json.loads(body)["problems"]
        assert any(f"delivery process {delivery} is not running" in p for p in problems), problems
        assert get(url + "/healthz")[0] == 503
        assert samples(get(url + "/metrics")[1], "elemta_ready") == {"": 0.0}
    finally:
        os.kill(supervisor, signal.SIGCONT)
    wait_for(lambda: get(url + "/readyz")[0] == 200, 20, what="/readyz to recover")
    assert get(url + "/healthz")[0] == 200
    text = get(url + "/metrics")[1]
    assert samples(text, "elemta_ready") == {"": 1.0}
    assert samples(text, "elemta_processes") == {'{role="smtp"}': 2, '{role="delivery"}': 1,
                                                 '{role="all"}': 0, '{role="monitor"}': 1}


def test_readiness_needs_a_writable_spool(open_dir):
    if os.geteuid() != 0:
        pytest.skip("runs the daemon as nobody, which needs root")
    spool = open_dir / "spool"
    config = CONFIG.replace("workers = 2", 'workers = 1\nuser = "nobody"')
    d = Daemon(open_dir, config, wrap=from_readable_copy)
    os.chmod(d.config_path, 0o644)  # the service's user reads it, as /etc/elemta/elemta.toml
    d.start()
    try:
        url = endpoint(d)
        assert get(url + "/readyz")[0] == 200, get(url + "/readyz")
        os.chmod(spool, 0o550)  # root's tests can write anywhere; the service's user cannot
        code, body = get(url + "/readyz")
        assert code == 503 and "cannot write in" in body, body
        os.chmod(spool, 0o750)
        assert get(url + "/readyz")[0] == 200
    finally:
        os.chmod(spool, 0o750)
        d.stop()


def test_unknown_paths_and_methods(daemon):
    url = endpoint(daemon)
    assert get(url + "/nothing")[0] == 404
    request = urllib.request.Request(url + "/metrics", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 501


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed")
def test_a_real_prometheus_scrapes_the_sums(daemon, tmp_path):
    target = endpoint(daemon).removeprefix("http://")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: elemta\n    static_configs:\n      - targets: ['{target}']\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query?query="

        def value(query: str) -> float | None:
            try:
                status, body = get(api + urllib.parse.quote(query))
            except OSError:
                return None
            result = json.loads(body)["data"]["result"] if status == 200 else []
            return float(result[0]["value"][1]) if result else None

        send(daemon.port, 25)
        accepted = 'sum(elemta_smtp_messages_total{result="accepted"})'
        wait_for(lambda: value(accepted) == 25, 60, what="Prometheus to see 25 accepted messages")
        wait_for(lambda: value('elemta_queue_recipients{state="held"}') == 25, 30, what="the queue gauge")
        assert value("up") == 1
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def test_readiness_needs_every_smtp_worker_to_have_bound_its_listeners(daemon):
    url = endpoint(daemon)
    status = json.loads((daemon.spool / "monitor" / "status.json").read_text())
    worker = next(p["pid"] for p in status["children"] if p["role"] == "smtp")
    mark = daemon.spool / "monitor" / f"listening-{worker}"
    assert json.loads(mark.read_text()) == [f"127.0.0.1:{daemon.port}"]
    mark.rename(mark.with_name("moved"))  # as if the worker were still binding
    code, body = get(url + "/readyz")
    assert code == 503 and f"SMTP worker {worker} has not bound its listeners" in body
    mark.with_name("moved").rename(mark)
    assert get(url + "/readyz")[0] == 200
    daemon.stop()
    assert not list((daemon.spool / "monitor").glob("listening-*")), "each worker removes its mark"


def test_deliveries_bounces_and_delays_are_counted(tmp_path):
    from tests.mx import Mx

    with Mx() as mx:
        mx.handler.script("gone@elsewhere.example", "550 5.1.1 no such user")
        config = (CONFIG.replace("hold = true", f'relayhost = "127.0.0.1:{mx.port}"\nrelayhost_tls_policy = "none"')
                  .replace('local_domains = ["example.com"]',
                           'local_domains = ["example.com"]\nrelay_domains = ["elsewhere.example"]'))
        d = Daemon(tmp_path, config).start()
        try:
            url = endpoint(d)
            with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
                client.sendmail("a@example.org", ["ok@elsewhere.example", "gone@elsewhere.example"],
                                "Subject: two\r\n\r\nhello\r\n")

            def attempts() -> dict:
                return samples(get(url + "/metrics")[1], "elemta_delivery_attempts_total")

            # Both recipients, then the bounce for the failed one (to a@example.org, same hop).
            wait_for(lambda: sum(attempts().values()) >= 3, 30, what="both recipients and the bounce")
            text = get(url + "/metrics")[1]
        finally:
            d.stop()
    hop = f'destination="smtp:127.0.0.1:{mx.port}"'
    assert attempts_of(text, "delivered", hop) == 2 and attempts_of(text, "failed", hop) == 1, text
    assert samples(text, "elemta_delivery_delay_seconds_count")[""] == 2
    assert samples(text, "elemta_reports_sent_total") == {'{kind="bounce"}': 1.0}


def attempts_of(text: str, result: str, hop: str) -> float:
    return samples(text, "elemta_delivery_attempts_total").get(f'{{{hop},result="{result}"}}', 0)
