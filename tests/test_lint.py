"""ruff over elemta/, tests/ and bench/ with the settings in pyproject.toml.

ruff is installed with the test extras (pip install '.[test]'), so the PyPI run of
run-tests.sh checks it; Debian bookworm has no ruff package, so the run on Debian's
packages skips this test."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff() -> list[str]:
    try:
        import ruff as module  # noqa: F401 -- only to know it is there
    except ImportError:
        found = shutil.which("ruff")
        if found is None:
            pytest.skip("ruff is not installed (it is in the test extras of pyproject.toml)")
        return [found]
    return [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing():
    done = subprocess.run([*ruff(), "check", "--no-cache", "elemta", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
