"""The greylist plugin against a real SQLite file, with a fake wall clock instead of sleeps."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from elemta.plugins import api
from elemta.plugins.builtin.greylist import CACHE_SECONDS, CLEANUP_EVERY, GreylistPlugin
from tests.support import Clock

DAY = 86400


@pytest.fixture()
def clock():
    return Clock()


@pytest.fixture()
def make(tmp_path, clock):
    """make(**options) -> a started plugin; all are stopped at the end of the test."""
    started = []
    lines = []

    def make(**options):
        plugin = GreylistPlugin("greylist", now=clock)
        plugin.configure({**GreylistPlugin.options, **options})
        plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path),
                                  log=lambda event, **kw: lines.append((event, kw))))
        plugin.lines = lines
        started.append(plugin)
        return plugin

    yield make
    for plugin in started:
        plugin.stop()


def rcpt(plugin, ip="192.0.2.10", sender="Alice@Example.ORG", recipient="bob@example.net",
         user=None, trusted=False, tx=None):
    conn = api.Connection(ip=ip, user=user, trusted=trusted)
    tx = tx or api.Transaction("Q1", sender)
    return plugin.on_rcpt_to(api.Context("on_rcpt_to", connection=conn, transaction=tx, recipient=recipient))


def deferred(verdict, seconds=None) -> bool:
    ok = verdict is not None and (verdict.action, verdict.code, verdict.esc) == ("defer", 450, "4.7.1")
    return ok and (seconds is None or f"try again in {seconds} seconds" in verdict.text)


def passes(verdict) -> bool:
    return verdict is None or verdict.action == "continue"


def test_first_try_is_deferred_with_the_delay_named(make):
    plugin = make()
    verdict = rcpt(plugin)
    assert deferred(verdict, 300)
    assert verdict.text == "Greylisted, try again in 300 seconds"
    assert plugin.lines[-1][0] == "greylisted"


def test_early_retries_are_deferred_without_resetting_first_seen(make, clock):
    plugin = make()
    assert deferred(rcpt(plugin), 300)
    clock.advance(100)
    assert deferred(rcpt(plugin), 200)
    clock.advance(199.5)
    assert deferred(rcpt(plugin), 1)
    clock.advance(0.5)  # 300 s after the first try, whatever the retries in between
    assert passes(rcpt(plugin))


def test_a_retry_after_the_delay_passes_with_a_header(make, clock):
    plugin = make()
    rcpt(plugin)
    clock.advance(305)
    verdict = rcpt(plugin)
    assert verdict.action == "continue"
    assert verdict.add_headers == (("X-Greylist", "passed after 305 seconds at mx.test (192.0.2.0/24)"),)
    assert ("passed", {"plugin": "greylist", "waited": 305, "network": "192.0.2.0/24",
                       "sender": "Alice@Example.ORG", "recipient": "bob@example.net"}) in plugin.lines


def test_no_header_when_add_header_is_off(make, clock):
    plugin = make(add_header=False)
    rcpt(plugin)
    clock.advance(300)
    assert rcpt(plugin) is None


def test_one_header_per_message_with_several_recipients(make, clock):
    plugin = make(auto_whitelist_after=0)
    rcpt(plugin, recipient="a@example.net")
    rcpt(plugin, recipient="b@example.net")
    clock.advance(300)
    tx = api.Transaction("Q2", "alice@example.org")
    first = rcpt(plugin, recipient="a@example.net", tx=tx)
    second = rcpt(plugin, recipient="b@example.net", tx=tx)
    assert first.add_headers and second is None


def test_a_passed_triplet_passes_again_at_once(make, clock):
    plugin = make(auto_whitelist_after=0)  # only the triplet itself, no network whitelist
    rcpt(plugin)
    clock.advance(300)
    assert passes(rcpt(plugin))
    clock.advance(DAY)
    assert rcpt(plugin) is None  # known: no delay, no header
    # The case of the addresses does not make another triplet.
    assert rcpt(plugin, sender="alice@example.org", recipient="BOB@example.net") is None
    assert deferred(rcpt(plugin, recipient="carol@example.net"), 300)


def test_a_passed_triplet_lasts_pass_lifetime_from_its_last_use(make, clock):
    plugin = make(auto_whitelist_after=0, pass_lifetime=10 * DAY)
    rcpt(plugin)
    clock.advance(300)
    rcpt(plugin)
    for _ in range(3):
        clock.advance(9 * DAY)  # 27 days in all: each use refreshes it
        assert rcpt(plugin) is None
    clock.advance(10 * DAY)
    assert deferred(rcpt(plugin), 300)


def test_auto_whitelist_lets_the_network_pass_at_once(make, clock):
    plugin = make()
    rcpt(plugin)
    clock.advance(300)
    rcpt(plugin)
    # Another machine of the same /24, another sender and recipient: no delay.
    assert rcpt(plugin, ip="192.0.2.77", sender="x@other.example", recipient="y@example.net") is None
    assert deferred(rcpt(plugin, ip="192.0.3.77"), 300)


def test_auto_whitelist_after_two_passes(make, clock):
    plugin = make(auto_whitelist_after=2)
    rcpt(plugin, recipient="a@example.net")
    rcpt(plugin, recipient="b@example.net")
    clock.advance(300)
    assert passes(rcpt(plugin, recipient="a@example.net"))
    assert deferred(rcpt(plugin, recipient="c@example.net"), 300)  # one pass is not enough
    assert passes(rcpt(plugin, recipient="b@example.net"))
    assert rcpt(plugin, recipient="d@example.net") is None


def test_auto_whitelist_expires_and_each_message_refreshes_it(make, clock):
    plugin = make(pass_lifetime=10 * DAY)
    rcpt(plugin)
    clock.advance(300)
    rcpt(plugin)
    for n in range(3):
        clock.advance(9 * DAY)
        assert rcpt(plugin, recipient=f"new{n}@example.net") is None
    clock.advance(10 * DAY + 1)
    assert deferred(rcpt(plugin, recipient="late@example.net"), 300)


def test_a_triplet_not_retried_within_the_window_starts_over(make, clock):
    plugin = make(retry_window=3600)
    rcpt(plugin)
    clock.advance(3600)
    assert deferred(rcpt(plugin), 300)  # a new first try
    clock.advance(299)
    assert deferred(rcpt(plugin), 1)
    clock.advance(1)
    assert passes(rcpt(plugin))


def test_authenticated_and_trusted_clients_are_not_greylisted_nor_recorded(make, tmp_path):
    plugin = make()
    assert rcpt(plugin, user="alice") is None
    assert rcpt(plugin, trusted=True) is None
    with sqlite3.connect(tmp_path / "greylist.db") as db:
        assert db.execute("SELECT count(*) FROM triplets").fetchone() == (0,)


def test_null_sender_is_greylisted_unless_skipped(make):
    assert deferred(rcpt(make(), sender=""), 300)
    assert rcpt(make(skip_null_sender=True), sender="") is None


def test_whitelist_networks_and_sender_domains(make):
    plugin = make(whitelist=["198.51.100.0/24", "2001:db8:aa::/48", "@Example.ORG", "203.0.113.9"])
    assert rcpt(plugin, ip="198.51.100.200", sender="x@elsewhere.example") is None
    assert rcpt(plugin, ip="2001:db8:aa:1::5", sender="x@elsewhere.example") is None
    assert rcpt(plugin, ip="::ffff:198.51.100.1", sender="x@elsewhere.example") is None
    assert rcpt(plugin, ip="203.0.113.9", sender="x@elsewhere.example") is None
    assert rcpt(plugin, ip="192.0.2.1", sender="someone@example.org") is None
    assert deferred(rcpt(plugin, ip="203.0.113.10", sender="x@elsewhere.example"))
    assert deferred(rcpt(plugin, ip="192.0.2.1", sender="x@sub.example.org"))
    # An IPv4 address is not in an IPv6 network whose integers happen to cover it.
    assert deferred(rcpt(make(whitelist=["::/96"]), ip="0.0.0.1"))


def test_a_second_instance_on_the_same_file_shares_the_state(make, clock):
    first, second = make(), make()  # as two worker processes would
    assert deferred(rcpt(first), 300)
    clock.advance(120)
    assert deferred(rcpt(second), 180)  # the same triplet, first_seen from the other one
    clock.advance(180)
    assert passes(rcpt(second))
    assert rcpt(first) is None  # passed in the other process: known here too
    # The auto-whitelist made by the second is seen by the first (not in its cache).
    assert rcpt(first, ip="192.0.2.200", recipient="new@example.net") is None


def test_the_whitelist_cache_is_trusted_only_briefly(make, clock, tmp_path):
    plugin = make()
    rcpt(plugin)
    clock.advance(300)
    rcpt(plugin)
    with sqlite3.connect(tmp_path / "greylist.db") as db:  # as an admin (or a cleanup) would
        db.execute("DELETE FROM awl")
        db.execute("DELETE FROM triplets")
    assert rcpt(plugin, recipient="a@example.net") is None  # from memory
    clock.advance(CACHE_SECONDS)
    assert deferred(rcpt(plugin, recipient="b@example.net"), 300)


def test_ipv6_clients_are_grouped_by_their_64(make, clock):
    plugin = make(auto_whitelist_after=0)
    assert deferred(rcpt(plugin, ip="2001:db8:1:2::1"), 300)
    clock.advance(300)
    assert passes(rcpt(plugin, ip="2001:db8:1:2:ffff:ffff:ffff:ffff"))
    assert deferred(rcpt(plugin, ip="2001:db8:1:3::1"), 300)
    wide = make(auto_whitelist_after=0, ipv6_prefix=48)
    assert deferred(rcpt(wide, ip="2001:db8:1:2::1", recipient="new@example.net"), 300)
    clock.advance(300)
    assert passes(rcpt(wide, ip="2001:db8:1:3::1", recipient="new@example.net"))


def test_expired_rows_are_cleaned_up_now_and_then(make, clock, tmp_path):
    plugin = make(retry_window=1000)
    for n in range(5):
        rcpt(plugin, recipient=f"r{n}@example.net")

    def rows():
        with sqlite3.connect(tmp_path / "greylist.db") as db:
            return db.execute("SELECT count(*) FROM triplets").fetchone()[0]

    assert rows() == 5
    clock.advance(CLEANUP_EVERY - 1)
    rcpt(plugin, ip="198.51.100.1")
    assert rows() == 6  # not yet: cleanups are not run on every call
    clock.advance(1001 - CLEANUP_EVERY + 1)
    rcpt(plugin, ip="203.0.113.2")
    assert rows() == 2  # the five first tries expired; the two newer ones stay
    assert plugin.lines[-2] == ("cleanup", {"plugin": "greylist", "triplets": 5, "networks": 0})


def test_database_option_places_the_file(make, tmp_path):
    make(database="grey/../other.db")
    assert (tmp_path / "other.db").exists()
    plugin = GreylistPlugin("greylist")
    plugin.configure({**GreylistPlugin.options, "database": str(tmp_path / "missing" / "g.db")})
    with pytest.raises(api.PluginError, match="^database: "):
        plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path)))


def test_concurrent_sessions_each_get_their_answer(make):
    plugin = make()
    results = []

    def session(n):
        for m in range(20):
            results.append(rcpt(plugin, ip=f"10.{n}.0.1", recipient=f"r{m}@example.net"))

    threads = [threading.Thread(target=session, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 160 and all(deferred(v, 300) for v in results)
    assert plugin.health() is None


def _worker_process(spool_dir: str, start: float) -> list[str]:
    """One worker process's plugin trying the same 50 triplets as the other one."""
    plugin = GreylistPlugin("greylist", now=lambda: start)
    plugin.start(api.Services(hostname="mx.test", spool_dir=spool_dir))
    try:
        return [str(rcpt(plugin, recipient=f"r{n}@example.net")) for n in range(50)]
    finally:
        plugin.stop()


def test_worker_processes_write_the_file_together(tmp_path, clock):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_worker_process, [(str(tmp_path), clock())] * 2)
    expected = str(api.defer(450, "4.7.1", "Greylisted, try again in 300 seconds"))
    assert all(text == expected for texts in results for text in texts)  # no "database is locked"
    with sqlite3.connect(tmp_path / "greylist.db") as db:
        assert db.execute("SELECT count(*), sum(count) FROM triplets").fetchone() == (50, 100)


@pytest.mark.parametrize("options, option", [
    ({"delay": -1}, "delay"),
    ({"delay": True}, "delay"),
    ({"delay": 600, "retry_window": 600}, "retry_window"),
    ({"pass_lifetime": 0}, "pass_lifetime"),
    ({"auto_whitelist_after": -1}, "auto_whitelist_after"),
    ({"ipv4_prefix": 33}, "ipv4_prefix"),
    ({"ipv6_prefix": 0}, "ipv6_prefix"),
    ({"whitelist": ["192.0.2.0/33"]}, "whitelist"),
    ({"whitelist": ["example.com"]}, "whitelist"),
    ({"whitelist": "@example.com"}, "whitelist"),
    ({"add_header": "yes"}, "add_header"),
    ({"database": 5}, "database"),
])
def test_bad_options_are_refused_by_name(options, option):
    plugin = GreylistPlugin("greylist")
    with pytest.raises(api.PluginError, match=f"^{option}: "):
        plugin.configure({**GreylistPlugin.options, **options})
