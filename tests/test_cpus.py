"""elemta.cpus: the CPUs a process may use, from fake /proc and cgroup trees; and the daemon
started with the default `workers = "auto"`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from elemta import cpus
from tests.support import Daemon, wait_for


def tree(tmp_path: Path, cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    return str(proc), str(root)


@pytest.fixture()
def affinity(monkeypatch):
    """Pretend the process may run on `n` CPUs."""
    def set_to(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
    set_to(8)
    return set_to


def test_v2_quota_rounds_up(tmp_path, affinity):
    proc, root = tree(tmp_path, "0::/system.slice/elemta.service\n",
                      {"system.slice/elemta.service/cpu.max": "150000 100000\n"})
    assert cpus.available(proc, root) == 2


def test_v2_max_is_no_quota(tmp_path, affinity):
    proc, root = tree(tmp_path, "0::/system.slice/elemta.service\n",
                      {"system.slice/elemta.service/cpu.max": "max 100000\n"})
    assert cpus.available(proc, root) == 8


def test_v2_quota_on_a_parent_limits_too(tmp_path, affinity):
    proc, root = tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "300000 100000\n",
        "kubepods/cpu.max": "max 100000\n",
    })
    assert cpus.available(proc, root) == 3


def test_v1_quota(tmp_path, affinity):
    proc, root = tree(tmp_path, "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert cpus.available(proc, root) == 3


def test_v1_no_quota(tmp_path, affinity):
    proc, root = tree(tmp_path, "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpus.available(proc, root) == 8


def test_nothing_readable_leaves_the_affinity(tmp_path, affinity):
    assert cpus.available(str(tmp_path / "no-proc"), str(tmp_path / "no-cgroup")) == 8
    proc, root = tree(tmp_path, "garbage\n0::/x\n", {"x/cpu.max": "nonsense\n"})
    assert cpus.available(proc, root) == 8


def test_the_smaller_of_affinity_and_quota(tmp_path, affinity):
    proc, root = tree(tmp_path, "0::/a\n", {"a/cpu.max": "400000 100000\n"})
    affinity(2)
    assert cpus.available(proc, root) == 2  # affinity is smaller
    affinity(16)
    assert cpus.available(proc, root) == 4  # the quota is


def test_auto_is_capped_at_15(tmp_path, affinity):
    affinity(64)
    assert cpus.auto_workers(str(tmp_path / "none"), str(tmp_path / "none")) == 15
    affinity(1)
    assert cpus.auto_workers(str(tmp_path / "none"), str(tmp_path / "none")) == 1


CONFIG = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"

[queue]
min_free_space = 0
"""


def supervising(daemon: Daemon) -> int:
    found = wait_for(lambda: re.search(r"NOQUEUE supervising workers=(\d+) ", daemon.log_text()), 15,
                     what="the supervisor's line")
    return int(found.group(1))


def test_the_default_starts_one_worker_per_cpu(tmp_path):
    expected = cpus.auto_workers()
    daemon = Daemon(tmp_path, CONFIG).start()
    try:
        assert supervising(daemon) == expected  # with delivery_process on, always supervised
    finally:
        assert daemon.stop() == 0


def test_an_affinity_of_one_cpu_starts_one_worker(tmp_path):
    daemon = Daemon(tmp_path, CONFIG).start(preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        assert supervising(daemon) == 1
    finally:
        assert daemon.stop() == 0
