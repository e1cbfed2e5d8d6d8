"""The plugins' statistics on disk, for `elemtactl plugins`.

Each elemta process writes its manager's statistics every few seconds to
<spool>/plugins/<role>-<worker>.json (written to a temporary file and renamed, so a reader
never sees half a file).  elemtactl reads every file whose process is still alive and adds
them up.  A file keeps no history: the counts start at zero when the process starts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DIRECTORY = "plugins"
INTERVAL = 5.0  # seconds between writes
_COUNTS = ("calls", "errors", "timeouts", "seconds")


def path_for(spool_dir: str, role: str, worker: int) -> Path:
    return Path(spool_dir) / DIRECTORY / f"{role}-{worker}.json"


def write(path: Path, plugins: list[dict]) -> None:
    path.parent.mkdir(mode=0o750, exist_ok=True)
    data = {"pid": os.getpid(), "written": time.time(), "plugins": plugins}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_all(spool_dir: str) -> tuple[list[dict], list[dict]]:
    """(plugins with the counts of every live process added up, the files read: path, pid, age)."""
    merged: dict[str, dict] = {}
    sources = []
    for path in sorted((Path(spool_dir) / DIRECTORY).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _alive(pid):
            continue  # left by a process that has stopped or crashed
        sources.append({"file": path.name, "pid": pid, "age": round(time.time() - data.get("written", 0), 1)})
        for plugin in data.get("plugins", []):
            _add(merged, plugin)
    return list(merged.values()), sources


def _add(merged: dict, plugin: dict) -> None:
    into = merged.get(plugin["name"])
    if into is None:
        merged[plugin["name"]] = json.loads(json.dumps(plugin))  # a deep copy
        return
    if plugin.get("health", "ok") != "ok":
        into["health"] = plugin["health"]
    into["last_error"] = plugin.get("last_error") or into.get("last_error", "")
    for hook, stats in plugin.get("hooks", {}).items():
        target = into["hooks"].setdefault(hook, {k: 0 for k in (*_COUNTS, "max_seconds")} | {"verdicts": {}})
        for key in _COUNTS:
            target[key] = target.get(key, 0) + stats.get(key, 0)
        target["max_seconds"] = max(target.get("max_seconds", 0), stats.get("max_seconds", 0))
        for action, count in stats.get("verdicts", {}).items():
            target["verdicts"][action] = target["verdicts"].get(action, 0) + count


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process (elemta's user): it exists
    return True
