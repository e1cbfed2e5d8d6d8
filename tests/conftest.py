"""Suite-wide settings and fixtures."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# As elemta.service runs (UMask=0027): files the tests write, such as TLS and DKIM keys, are
# not readable by others, which elemta requires of its secrets.  Tests that need a file
# readable by another user set its mode themselves.
os.umask(0o027)


@pytest.fixture
def open_dir():
    """A temporary directory other users may enter (0755 under /tmp): for a daemon that runs
    as nobody, or a submitter of another UID; pytest's own tmp_path lies under a 0700 one."""
    path = Path(tempfile.mkdtemp(prefix="elemta-open-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
