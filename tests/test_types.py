"""mypy over elemta/ with the settings in pyproject.toml ([tool.mypy]: its default level).

mypy is in the test extras (pip install '.[test]'), so the PyPI run of run-tests.sh checks
the code against the newest releases' own type information; the run on Debian's packages has
no mypy and skips this test, as test_lint.py does without ruff."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_nothing(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extras of pyproject.toml)")
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
