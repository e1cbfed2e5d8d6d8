"""queue.min_free_space keeps the disk from filling: the file system's own free space is checked
at MAIL and again before each commit (issue 16, defect 6: with a 5 MiB margin the disk reached
0 bytes free, because only committed message bytes were counted)."""

from __future__ import annotations

import os
import smtplib
import subprocess
import threading

import pytest

from elemta.errors import QueueFullError
from elemta.queue.model import NewMessage, NewRecipient
from elemta.queue.store import Store
from tests.support import Daemon


def message(store: Store, size: int) -> NewMessage:
    return NewMessage(store.new_id(), "a@example.org", (NewRecipient("b@example.net"),),
                      b"Subject: x\r\n\r\n" + b"y" * size)


class FakeStatvfs:
    """os.statvfs with a free space the test sets (the disk is shared with other programs)."""

    def __init__(self, free: int):
        self.free = free

    def __call__(self, path):
        return os.statvfs_result((4096, 4096, 1 << 20, 0, self.free // 4096, 0, 0, 0, 0, 255))


def test_the_writer_refuses_what_would_go_below_the_margin(tmp_path, monkeypatch):
    fake = FakeStatvfs(10_000_000)
    monkeypatch.setattr("elemta.queue.store.os.statvfs", fake)
    with Store(str(tmp_path / "q.db")) as store:
        # The WAL counts as used: what it holds will grow queue.db at the next checkpoint.
        wal = (tmp_path / "q.db-wal").stat().st_size
        store.set_limits(min_free_bytes=10_000_000 - wal - 300_000, max_messages=0, max_bytes=0)
        assert store.intake_check() is None
        store.enqueue(message(store, 100_000))  # 2 x 100 KB and a row fit in the 300 KB left
        with pytest.raises(QueueFullError, match="queue.min_free_space"):
            store.enqueue(message(store, 400_000))  # 800 KB would not
        fake.free = 9_000_000
        assert store.intake_check() == "disk"  # MAIL looks at the disk itself, every time


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root)")
def test_a_flood_into_a_small_disk_stops_at_the_margin(open_dir):
    disk = open_dir / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(disk)], check=True, timeout=30)
    try:
        daemon = Daemon(disk, f"""
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "{disk}/spool"

[smtp]
relay_domains = ["example.net"]
max_message_size = 2_000_000

[queue]
min_free_space = 6_000_000

[delivery]
hold = true
""").start()
        accepted, refused = [], []
        lock = threading.Lock()

        def sender():
            for _ in range(12):
                try:
                    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                        client.sendmail("a@example.org", ["b@example.net"], b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 10_000)
                    with lock:
                        accepted.append(1)
                except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused,
                        smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                    code = getattr(exc, "smtp_code", None) or next(iter(exc.recipients.values()))[0]
                    with lock:
                        refused.append(code)
        threads = [threading.Thread(target=sender) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        try:
            assert refused and set(refused) == {452}, refused  # 452 4.3.1, never a lost 250
            assert len(daemon.messages()) == len(accepted)
            st = os.statvfs(disk)
            sizes = {str(p.relative_to(disk)): p.stat().st_size for p in disk.rglob("*") if p.is_file()}
            assert st.f_bavail * st.f_frsize > 3_000_000, (len(accepted), sizes, daemon.log_text()[-3000:])
            assert st.f_bavail * st.f_frsize > 3_000_000  # the margin held (to half, allowing for the log)
        finally:
            daemon.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=30)
