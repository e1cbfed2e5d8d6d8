"""delivery/mtasts_cache.py: policies survive the process, failures hold off refetching."""

import os
import stat
import threading

from elemta import filemodes
from elemta.delivery.mtasts import Cached, Policy
from elemta.delivery.mtasts_cache import FILENAME, RETRY_FAILED_FETCH, PolicyCache

POLICY = Policy("enforce", 86400, ("mx.example.com", "*.backup.example.net"))


def test_a_policy_outlives_the_process_that_fetched_it(tmp_path):
    cache = PolicyCache(str(tmp_path))
    cache.put("Example.COM.", Cached(POLICY, "id1", 1_700_000_000.5))
    cache.close()
    again = PolicyCache(str(tmp_path))  # a restart
    assert again.get("example.com") == Cached(POLICY, "id1", 1_700_000_000.5)
    assert again.get("example.org") is None
    again.put("example.com", Cached(Policy("none", 60, ()), "id2", 1_700_000_100.0))  # a newer one replaces it
    assert again.get("EXAMPLE.com") == Cached(Policy("none", 60, ()), "id2", 1_700_000_100.0)
    again.close()


def test_a_failed_fetch_holds_off_the_next_until_the_retry_time_or_a_good_fetch(tmp_path):
    cache = PolicyCache(str(tmp_path))
    assert cache.may_fetch("example.com", 1000.0)
    cache.fetch_failed("example.com", 1000.0, "HTTP 404 Not Found")
    assert cache.last_failure("example.com") == (1000.0, "HTTP 404 Not Found")
    assert not cache.may_fetch("example.com", 1000.0 + RETRY_FAILED_FETCH - 1)
    assert cache.may_fetch("example.com", 1000.0 + RETRY_FAILED_FETCH)
    assert cache.may_fetch("example.org", 1000.0)  # per domain
    cache.put("example.com", Cached(POLICY, "id1", 1001.0))
    assert cache.last_failure("example.com") is None
    cache.close()


def test_a_reader_never_creates_the_file_and_sees_what_the_writer_kept(tmp_path):
    reader = PolicyCache(str(tmp_path), readonly=True)
    assert reader.get("example.com") is None and reader.last_failure("example.com") is None
    assert not (tmp_path / FILENAME).exists()
    writer = PolicyCache(str(tmp_path))
    writer.put("example.com", Cached(POLICY, "id1", 5.0))
    assert PolicyCache(str(tmp_path), readonly=True).get("example.com") == Cached(POLICY, "id1", 5.0)
    writer.close()


def test_the_file_is_not_for_others_on_the_box(tmp_path):
    old = os.umask(filemodes.UMASK)  # as the supervisor sets it for every elemta process
    try:
        cache = PolicyCache(str(tmp_path))
        cache.put("example.com", Cached(POLICY, "id1", 5.0))
        made = sorted(p.name for p in tmp_path.iterdir())
        modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in made}
        cache.close()
    finally:
        os.umask(old)
    assert FILENAME in made and f"{FILENAME}-wal" in made  # the WAL and its lock file too
    assert all(mode & 0o007 == 0 for mode in modes.values()), {n: oct(m) for n, m in modes.items()}


def test_delivery_threads_may_write_and_read_at_once(tmp_path):
    # The finder lets fetches of different domains run in parallel: their writes share one
    # connection, and a second BEGIN inside the first's transaction must not happen.
    cache = PolicyCache(str(tmp_path))
    errors, domains = [], [f"d{i}.example" for i in range(8)]

    def work(domain):
        try:
            for n in range(25):
                cache.put(domain, Cached(POLICY, f"id{n}", float(n)))
                cache.fetch_failed(domain, float(n), "HTTP 503")
                assert cache.get(domain) is not None
        except Exception as exc:  # noqa: BLE001 -- collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in domains]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert all(cache.get(d) == Cached(POLICY, "id24", 24.0) for d in domains)
    cache.close()
    again = PolicyCache(str(tmp_path))  # and it is all on disk
    assert all(again.get(d) == Cached(POLICY, "id24", 24.0) for d in domains)
    again.close()
