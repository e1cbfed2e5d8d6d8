"""delivery/mtasts_finder.py with real parts: a DNS server and an HTTPS policy host on loopback."""

import sqlite3
import threading

import pytest

from elemta.delivery.dns import Resolver
from elemta.delivery.mtasts import Policy
from elemta.delivery.mtasts_cache import RETRY_FAILED_FETCH, PolicyCache
from elemta.delivery.mtasts_fetch import fetch_policy
from elemta.delivery.mtasts_finder import PolicyFinder
from tests.dnsserver import DnsServer
from tests.policyserver import POLICY, PolicyServer

ENFORCE = Policy("enforce", 86400, ("mx.example.test",))


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def parts(ca, ca_file, tmp_path):
    host = PolicyServer(ca)
    records = {
        "_mta-sts.example.test": [("TXT", "v=STSv1; id=one;")],
        "mta-sts.example.test": [("A", "127.0.0.1")],
    }
    with DnsServer(records) as dns_server:
        clock = Clock()
        # The resolver's cache runs on its own clock: TTLs never end within a test.
        resolver = Resolver([dns_server.nameserver], timeout=5.0)
        (tmp_path / "spool").mkdir()
        cache = PolicyCache(str(tmp_path / "spool"))
        finder = PolicyFinder(cache, resolver, ca_file=ca_file, clock=clock, port=host.port)
        yield finder, host, dns_server, clock, resolver
        cache.close()
    host.stop()


def test_a_published_policy_is_fetched_once_then_applied_from_the_cache(parts):
    finder, host, _dns, clock, _ = parts
    found = finder.find("Example.TEST.")
    assert (found.policy, found.note) == (ENFORCE, "fetched")
    clock.now += 3600
    again = finder.find("example.test")
    assert (again.policy, again.note) == (ENFORCE, "cached")
    assert len(host.paths) == 1


def test_a_new_record_id_fetches_the_new_policy(parts):
    finder, host, dns_server, clock, resolver = parts
    finder.find("example.test")
    host.reply = (200, "text/plain", POLICY.replace(b"enforce", b"testing"), {})
    dns_server.remove("_mta-sts.example.test")
    dns_server.add("_mta-sts.example.test", "TXT", "v=STSv1; id=two;")
    resolver.clear()
    found = finder.find("example.test")
    assert (found.policy.mode, found.cached.id, found.note) == ("testing", "two", "fetched")


def test_with_the_policy_host_down_the_cached_policy_still_applies(parts):
    finder, host, _dns, clock, resolver = parts
    finder.find("example.test")
    host.stop()
    clock.now += 86400 * 0.6  # past half its age: refreshed, and the refresh fails
    found = finder.find("example.test")
    assert found.policy == ENFORCE
    assert found.note.startswith("fetch failed: 127.0.0.1: ConnectionRefusedError")
    clock.now += 86400 * 0.5  # expired: nothing applies any more
    assert finder.find("example.test").policy is None


def test_with_the_policy_host_down_and_nothing_cached_there_is_no_policy(parts):
    finder, host, _dns, clock, _ = parts
    host.reply = (503, "text/plain", b"down", {})
    found = finder.find("example.test")
    assert found.policy is None and found.note == "fetch failed: 127.0.0.1: HTTP 503 Service Unavailable"
    host.reply = (200, "text/plain", POLICY, {})
    assert finder.find("example.test").note == "no policy"  # held off: not asked again at once
    assert len(host.paths) == 1
    clock.now += RETRY_FAILED_FETCH
    assert finder.find("example.test").policy == ENFORCE


def test_a_hidden_record_does_not_turn_a_cached_policy_off(parts):
    finder, host, dns_server, clock, resolver = parts
    finder.find("example.test")
    dns_server.remove("_mta-sts.example.test")  # an attacker strips the record
    resolver.clear()
    clock.now += 3600
    found = finder.find("example.test")
    assert (found.policy, found.note) == (ENFORCE, "cached")


def test_an_invalid_policy_is_not_applied_and_says_why(parts):
    finder, host, _dns, _clock, _ = parts
    host.reply = (200, "text/plain", b"version: STSv1\nmode: enforce\nmax_age: 60\n", {})
    found = finder.find("example.test")
    assert found.policy is None and found.note == "fetch failed: mode enforce without mx"


def test_a_domain_without_a_record_has_no_policy_and_fetches_nothing(parts):
    finder, host, _dns, _clock, _ = parts
    assert finder.find("other.test").policy is None
    assert host.paths == []


def test_deliveries_to_one_domain_share_one_fetch(parts, monkeypatch):
    finder, host, _dns, _clock, _ = parts
    started, release, fetches = threading.Event(), threading.Event(), []

    def slow_fetch(*args, **kwargs):
        fetches.append(args[0])
        started.set()
        assert release.wait(10)
        return fetch_policy(*args, **kwargs)

    finder.fetch = slow_fetch
    looked_up = threading.Event()
    txt = finder.resolver.txt

    def noting_txt(name):
        answer = txt(name)
        if started.is_set():  # the second delivery: next it takes the domain's lock
            looked_up.set()
        return answer

    monkeypatch.setattr(finder.resolver, "txt", noting_txt)
    results = []
    first = threading.Thread(target=lambda: results.append(finder.find("example.test")))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(finder.find("example.test")))
    second.start()
    assert looked_up.wait(10)
    release.set()
    first.join(10)
    second.join(10)
    assert fetches == ["example.test"]
    assert sorted(r.note for r in results) == ["cached", "fetched"]
    assert all(r.policy == ENFORCE for r in results)


def test_a_policy_that_cannot_be_kept_on_disk_is_applied_all_the_same(parts, monkeypatch):
    finder, *_ = parts

    def full_disk(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(finder.cache, "put", full_disk)
    found = finder.find("example.test")
    assert (found.policy, found.note) == (ENFORCE, "fetched, not kept on disk")
