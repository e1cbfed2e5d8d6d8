"""elemta.delivery.wake: the scheduler thread's sleep."""

from __future__ import annotations

import os

from elemta.delivery.wake import Wake


def test_the_scheduler_sleep_ends_at_a_wake_or_a_byte_in_the_workers_pipe():
    """What a wake-up leaves is read away: the next sleep is a sleep again."""
    wake = Wake()
    read, write = os.pipe()
    try:
        wake.watch(read)
        assert wake.wait(0) is False
        wake.set()
        wake.set()
        assert wake.wait(10) is True and wake.wait(0) is False
        os.write(write, b"!!!")  # the SMTP workers' commits (wakeup.poke)
        assert wake.wait(10) is True and wake.wait(0) is False
        wake.close()
        wake.set()  # after close: nothing (the number may be another file's by now)
    finally:
        os.close(read)
        os.close(write)
