"""How many CPUs this process may really use: what `server.workers = "auto"` starts.

os.cpu_count() counts the machine's CPUs; a process may be allowed fewer. Two things limit it:
  - its CPU affinity (taskset, systemd's CPUAffinity=, a container's cpuset): sched_getaffinity;
  - a CPU quota (systemd's CPUQuota=, docker --cpus, a Kubernetes CPU limit): the cgroup's
    cpu.max (cgroup v2, "QUOTA PERIOD" or "max PERIOD") or cpu.cfs_quota_us and
    cpu.cfs_period_us (cgroup v1, -1 for none). A quota set on a parent cgroup limits every
    cgroup below it too, so each level up to the root is read and the smallest wins.
A quota of 1.5 CPUs gives 2: two workers sharing one and a half CPUs still use all of it.
Whatever cannot be read (no cgroup file system, a sandbox hiding /proc) is left out.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_WORKERS = 15  # queue IDs carry 4 bits of process number; 15 is the delivery process's


def available(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: at least 1."""
    counts = [_affinity()]
    quota = _quota(Path(proc), Path(cgroup_root))
    if quota is not None:
        counts.append(quota)
    return max(1, min(counts))


def auto_workers(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """One SMTP worker per available CPU, at most MAX_WORKERS."""
    return min(available(proc, cgroup_root), MAX_WORKERS)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _quota(proc: Path, root: Path) -> int | None:
    """The smallest CPU quota over this process's cgroups and their parents, in whole CPUs."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # cgroup v2: "0::/system.slice/elemta.service"
            found += [_v2(directory) for directory in _levels(root, path)]
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/docker/abc"
            mount = next((root / name for name in ("cpu,cpuacct", "cpu") if (root / name).is_dir()), None)
            if mount is not None:
                found += [_v1(directory) for directory in _levels(mount, path)]
    quotas = [quota for quota in found if quota is not None]
    return min(quotas) if quotas else None


def _levels(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and each parent up to the mount point."""
    parts = [part for part in path.strip("/").split("/") if part and part != ".."]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2(directory: Path) -> int | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else _cpus(quota, period)


def _v1(directory: Path) -> int | None:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return None if quota.startswith("-") else _cpus(quota, period)


def _cpus(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None
