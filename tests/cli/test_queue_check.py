"""`elemtactl queue check` (issue 16, defect 5): sound, damaged, emptied."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.queue.test_integrity import fill
from tests.support import ROOT

CTL = ROOT / "bin" / "elemtactl"


def run(config, *args):
    return subprocess.run([str(CTL), "--config", str(config), "queue", "check", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def queue(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    fill(spool / "queue.db", 120)
    config = tmp_path / "elemta.toml"
    config.write_text(f'[server]\nspool_dir = "{spool}"\nuser = "root"\n')
    return config, spool / "queue.db"


def test_a_sound_queue(queue):
    config, _ = queue
    result = run(config)
    assert (result.returncode, result.stdout) == (0, "ok: 120 messages, no damage found\n")
    assert json.loads(run(config, "--json", "--full").stdout) == {
        "ok": True, "problems": [], "messages": 120, "without_text": 0}


def test_a_damaged_queue_is_65_with_its_problems(queue):
    config, path = queue
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2 // 16384 * 16384)
        handle.write(os.urandom(16384))
    result = run(config)
    assert result.returncode == 65
    assert result.stdout.startswith("damaged: ")


def test_an_emptied_queue_is_65(queue):
    config, path = queue
    os.truncate(path, 0)
    result = run(config, "--json")
    assert result.returncode == 65
    report = json.loads(result.stdout)
    assert report["ok"] is False and "is empty (0 bytes)" in report["problems"][0]
