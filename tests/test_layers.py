"""Imports point down the layers of docs/architecture.md; smtp and delivery never meet.

cli -> supervisor -> daemon -> {smtp, delivery, monitor} -> {queue, plugins} -> {config, log, errors}
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "elemta"

# What each part of elemta may import from elemta (besides itself).
ALLOWED = {
    "errors": set(),
    "config": {"errors", "transport", "cpus"},
    "cpus": set(),
    "transport": set(),
    "local": {"errors", "config"},
    "passwords": {"errors"},
    "ratelimit": {"shm"},
    "shm": set(),
    "dnscache": {"errors", "metrics"},
    "log": set(),
    "metrics": set(),
    "filemodes": {"errors"},
    "sdnotify": set(),
    "pidfile": set(),
    "wakeup": set(),
    "privileges": {"errors", "config", "filemodes"},
    "maildrop": {"queue"},
    "pickup": {"errors", "config", "log", "queue", "maildrop", "smtp"},
    "queue": {"errors", "config", "metrics"},
    "plugins": {"errors", "config", "ratelimit", "dnscache", "log", "metrics"},
    "smtp": {"local", "transport", "errors", "config", "log", "queue", "plugins", "passwords", "ratelimit",
             "filemodes", "metrics", "shm"},
    "delivery": {"local", "transport", "errors", "config", "log", "queue", "plugins", "dnscache", "filemodes",
                 "metrics"},
    "monitor": {"errors", "config", "log", "queue", "metrics", "__init__", "wakeup"},
    "daemon": {"local", "transport", "errors", "config", "log", "queue", "plugins", "smtp", "delivery", "monitor",
               "passwords", "ratelimit", "dnscache", "filemodes", "sdnotify", "pickup", "metrics", "wakeup", "shm"},
    "supervisor": {"errors", "config", "log", "daemon", "filemodes", "privileges", "sdnotify", "pidfile",
                   "metrics", "monitor", "wakeup"},
    "cli": {"errors", "config", "log", "queue", "daemon", "supervisor", "passwords", "plugins", "__init__",
            "filemodes", "pidfile", "maildrop", "smtp", "privileges", "monitor"},
    "__init__": set(),
    "__main__": {"cli"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "elemta":  # from elemta import config, __version__
                names = [
                    f"elemta.{a.name}" if _is_module(a.name) else "elemta" for a in node.names
                ]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "elemta" or name.startswith("elemta."):
                parts.add(name.split(".")[1] if "." in name else "__init__")
    return parts


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists()


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    part = part_of(path)
    assert part in ALLOWED, f"{part}: a new part of elemta needs its place in ALLOWED"
    upward = imported_parts(path) - ALLOWED[part] - {part}
    assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)} against the layers"
