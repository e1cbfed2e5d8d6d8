"""SessionThreads: a finished session's thread takes the next one; none waits for a thread."""

from __future__ import annotations

import threading

from elemta.smtp.threads import SessionThreads
from tests.support import wait_for


def test_a_finished_thread_serves_the_next_session():
    threads = SessionThreads(idle_timeout=30)
    ran_on = []
    done = threading.Event()
    threads.submit(lambda: (ran_on.append(threading.get_ident()), done.set()))
    done.wait(5)
    wait_for(lambda: threads.idle() == 1, 5, what="the thread to wait for more")
    second = threading.Event()
    threads.submit(lambda: (ran_on.append(threading.get_ident()), second.set()))
    assert second.wait(5)
    assert ran_on[0] == ran_on[1]
    threads.close()


def test_sessions_never_wait_behind_a_busy_thread():
    threads = SessionThreads(idle_timeout=30)
    release = threading.Event()
    started = []
    for n in range(5):  # five sessions that all block until released: five threads
        threads.submit(lambda n=n: (started.append(n), release.wait(10)))
    wait_for(lambda: len(started) == 5, 5, what="all five sessions running at once")
    release.set()
    wait_for(lambda: threads.idle() == 5, 5, what="five idle threads")
    threads.close()
    wait_for(lambda: threads.idle() == 0, 5, what="idle threads to end")


def test_idle_threads_end_after_the_timeout_and_work_still_runs():
    threads = SessionThreads(idle_timeout=0.05)
    names = set()
    for _ in range(20):
        done = threading.Event()
        threads.submit(lambda d=done: (names.add(threading.current_thread().name), d.set()))
        assert done.wait(5)
    wait_for(lambda: threads.idle() == 0, 5, what="idle threads to time out")
    done = threading.Event()
    threads.submit(done.set)
    assert done.wait(5)


def test_at_most_max_idle_threads_are_kept():
    threads = SessionThreads(name="kept-test", idle_timeout=30, max_idle=2)
    release = threading.Event()
    started = []
    for n in range(4):
        threads.submit(lambda n=n: (started.append(n), release.wait(10)))
    wait_for(lambda: len(started) == 4, 5, what="four sessions")

    def ours() -> int:  # only this pool's threads: other tests' threads come and go
        return sum(1 for t in threading.enumerate() if t.name.startswith("kept-test"))

    assert ours() == 4
    release.set()
    wait_for(lambda: ours() == 2, 5, what="two threads to end")
    assert threads.idle() == 2
    threads.close()
