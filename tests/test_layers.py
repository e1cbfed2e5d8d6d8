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
    "passwords": {"errors", "passhash"},
    "passhash": set(),
    "ratelimit": {"shm"},
    "shm": set(),
    "dnscache": {"errors", "metrics"},
    "log": set(),
    "metrics": set(),
    "filemodes": {"errors"},
    "sdnotify": set(),
    "pidfile": set(),
    "wakeup": set(),
    "sockopts": set(),
    "priorities": set(),
    "reply": set(),
    "privileges": {"errors", "config", "filemodes"},
    "maildrop": {"queue"},
    "pickup": {"errors", "config", "log", "queue", "maildrop", "smtp"},
    "queue": {"errors", "config", "metrics", "priorities"},
    "plugins": {"errors", "config", "ratelimit", "dnscache", "log", "metrics", "priorities", "reply"},
    "smtp": {"local", "transport", "errors", "config", "log", "queue", "plugins", "passwords", "ratelimit",
             "filemodes", "metrics", "shm", "sockopts", "reply"},
    "delivery": {"local", "transport", "errors", "config", "log", "queue", "plugins", "dnscache", "filemodes",
                 "metrics", "sockopts", "reply"},
    "monitor": {"errors", "config", "log", "queue", "metrics", "__init__", "wakeup"},
    "assemble": {"local", "errors", "config", "log", "queue", "plugins", "smtp", "delivery", "ratelimit",
                 "filemodes", "shm"},
    "daemon": {"local", "transport", "errors", "config", "log", "queue", "plugins", "smtp", "delivery", "monitor",
               "passwords", "ratelimit", "dnscache", "filemodes", "sdnotify", "pickup", "metrics", "wakeup", "shm",
               "assemble"},
    "supervisor": {"errors", "config", "log", "daemon", "assemble", "filemodes", "privileges", "sdnotify", "pidfile",
                   "metrics", "monitor", "wakeup"},
    "cli": {"errors", "config", "log", "queue", "daemon", "assemble", "supervisor", "passwords", "plugins", "__init__",
            "filemodes", "pidfile", "maildrop", "smtp", "privileges", "monitor", "delivery"},
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


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = ["elemta", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The elemta modules path imports, type-only imports (under TYPE_CHECKING) included:
    a cycle of those still ties the two modules together for a reader and for mypy."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("elemta"):
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in BY_NAME else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("elemta"))
    return found & set(BY_NAME)


BY_NAME = {module_name(p): p for p in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_modules():
    # A package's __init__ that re-exports its modules is not a cycle with them: only the
    # modules' own imports count, with an import of a package read as one of its __init__.
    graph = {name: imported_modules(path) - {name} for name, path in BY_NAME.items()
             if path.name != "__init__.py"}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
