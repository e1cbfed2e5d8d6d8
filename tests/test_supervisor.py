"""Start-up as a service: the open-files limit sized for server.max_connections."""

from __future__ import annotations

import os
import resource
import signal

from elemta import supervisor
from elemta.config import Config, ServerConfig
from tests.support import Daemon, wait_for

CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
max_connections = 1000
"""


def limits_of(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open files line")


def test_a_low_soft_limit_is_raised_to_what_the_connections_need(tmp_path):
    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 8192))

    daemon = Daemon(tmp_path, CONFIG)
    daemon.start(preexec_fn=low)
    try:
        needed = 1000 * supervisor.FILES_PER_CONNECTION + supervisor.FILES_FIXED
        assert limits_of(daemon.proc.pid) == (needed, 8192)
        assert "resource_warning" not in daemon.log_text()
    finally:
        daemon.stop()


def test_a_hard_limit_too_low_is_named_in_the_log(tmp_path):
    daemon = Daemon(tmp_path, CONFIG)
    daemon.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512)))
    try:
        line = wait_for(lambda: [x for x in daemon.log_text().splitlines() if "resource_warning" in x],
                        what="the warning")[0]
        assert "open files limit 512 is below the 2064 that server.max_connections = 1000 may need" in line
        assert "raise LimitNOFILE=" in line
    finally:
        daemon.stop()


def test_open_files_warning_without_a_daemon():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    small = Config(server=ServerConfig(max_connections=1))
    assert supervisor.open_files_warning(small) is None
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)  # enough already: untouched


def test_without_ipv6_drops_the_ipv6_listeners_and_refuses_to_keep_none():
    import pytest

    from elemta.config import Listener
    from elemta.errors import ConfigError

    both = Config(listeners=(Listener("0.0.0.0:25"), Listener("[::]:25"), Listener("[::1]:587", "submission")))
    config, dropped = supervisor.without_ipv6(both)
    assert [lst.address for lst in config.listeners] == ["0.0.0.0:25"]
    assert dropped == ["[::]:25", "[::1]:587"]
    assert supervisor.without_ipv6(Config(listeners=(Listener("127.0.0.1:25"),)))[1] == []
    with pytest.raises(ConfigError, match="every listener is an IPv6 address"):
        supervisor.without_ipv6(Config(listeners=(Listener("[::]:25"),)))


def test_a_child_that_will_not_stop_is_killed_and_named(tmp_path):
    daemon = Daemon(tmp_path, CONFIG.replace("max_connections = 1000", "grace_period = 0.5\nworkers = 2")).start()
    child = int(wait_for(lambda: _child_of(daemon.proc.pid), 10, what="a worker"))
    os.kill(child, signal.SIGSTOP)  # stuck: it cannot act on SIGTERM
    assert daemon.stop(timeout=2 * 0.5 + supervisor.STOP_MARGIN + 20) == 70  # EX_SOFTWARE: a bug
    assert "stop_forced worker=" in daemon.log_text() and f"pid={child} " in daemon.log_text()


def _child_of(pid: int) -> int | None:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
        children = handle.read().split()
    return int(children[0]) if children else None
