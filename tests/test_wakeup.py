"""The signal-safe wake-up of the main loops (supervisor, worker, monitor)."""

from __future__ import annotations

import os
import signal

from elemta.wakeup import Wakeup


def test_a_poke_from_a_signal_handler_ends_the_wait_and_pokes_merge():
    wake = Wakeup()
    previous = signal.signal(signal.SIGUSR2, lambda *_: wake.poke())
    try:
        assert wake.wait(0) is False
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGUSR2)
        assert wake.wait(5) is True
        assert wake.wait(0) is False  # the three pokes were one wake-up
    finally:
        signal.signal(signal.SIGUSR2, previous)
        wake.close()


def test_a_full_pipe_is_still_a_wake_up():
    wake = Wakeup()
    try:
        for _ in range(100_000):  # far more than a pipe holds: never blocks, never raises
            wake.poke()
        assert wake.wait(0) is True and wake.wait(0) is False
    finally:
        wake.close()
