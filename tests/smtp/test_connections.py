"""smtp/connections.py: the caps with their reserved slots, whole deadlines, stress mode.

Real sockets (socketpairs), a given clock: sweep() is called with `now`, so no test waits."""

from __future__ import annotations

import socket

import pytest

from elemta.smtp import replies
from elemta.smtp.connections import Connections, Limits


def limits(**overrides) -> Limits:
    values = dict(
        command_timeout=300.0, data_timeout=180.0, greet_pause=0.0, max_connections=8,
        max_connections_per_ip=20, trusted=(), reserved=2, min_data_rate=500,
        stress_timeout=10.0, stress_at=6,
    )
    values.update(overrides)
    return Limits(**values)


@pytest.fixture
def pairs():
    made = []

    def make():
        pair = socket.socketpair()
        made.append(pair)
        return pair

    yield make
    for a, b in made:
        a.close()
        b.close()


def test_the_reserved_slots_are_only_for_trusted_and_submission_clients(pairs):
    table, lim = Connections(), limits()
    for n in range(6):
        number, watch, refusal = table.admit(f"192.0.2.{n}", pairs()[0], lim)
        assert refusal is None and number and watch is not None
    _, _, refusal = table.admit("192.0.2.99", pairs()[0], lim)
    assert refusal is replies.TOO_MANY_CONNECTIONS  # port 25, untrusted: 6 of 8 is its cap
    for _ in range(2):
        assert table.admit("10.0.0.1", pairs()[0], lim, reserved=True)[2] is None
    assert table.admit("10.0.0.1", pairs()[0], lim, reserved=True)[2] is replies.TOO_MANY_CONNECTIONS


def test_a_proxied_client_that_may_not_use_the_reserve_is_refused_when_it_holds_a_reserved_slot(pairs):
    table, lim = Connections(), limits()
    for n in range(6):
        table.admit(f"192.0.2.{n}", pairs()[0], lim)
    # Behind a proxy the client is unknown at accept: admitted into the reserve for now.
    number, _, refusal = table.admit("10.0.0.9", pairs()[0], lim, per_ip=False, reserved=True)
    assert refusal is None
    assert table.rekey(number, "198.51.100.7", lim, reserved=False) is replies.TOO_MANY_CONNECTIONS
    assert table.rekey(number, "198.51.100.8", lim, reserved=True) is None


def test_a_command_has_a_whole_deadline_not_one_per_read(pairs):
    table, lim = Connections(), limits(command_timeout=5.0)
    _, watch, _ = table.admit("192.0.2.1", pairs()[0], lim)
    watch.asked(in_data=False)
    start = watch.since
    # Each read came well inside any per-read timeout; what counts is the whole line.
    assert table.sweep(lim, now=start + 4.9) == (0, None)
    assert not watch.expired
    assert table.sweep(lim, now=start + 5.1)[0] == 1
    assert watch.expired


def test_the_sweep_wakes_a_blocked_reader_with_end_of_file(pairs):
    table, lim = Connections(), limits(command_timeout=1.0)
    ours, theirs = pairs()
    _, watch, _ = table.admit("192.0.2.1", ours, lim)
    table.sweep(lim, now=watch.since + 2)
    ours.settimeout(5)
    assert ours.recv(10) == b""  # what the session's recv sees: it then says 421 4.4.2
    ours.sendall(b"421 4.4.2\r\n")  # only the read side was shut: the 421 still goes out
    theirs.settimeout(5)
    assert theirs.recv(20) == b"421 4.4.2\r\n"


def test_message_text_earns_time_at_the_minimum_rate(pairs):
    table, lim = Connections(), limits(data_timeout=10.0, min_data_rate=100)
    _, watch, _ = table.admit("192.0.2.1", pairs()[0], lim)
    watch.asked(in_data=True)
    start = watch.since
    watch.data_bytes = 2_000  # 20 s more
    assert table.sweep(lim, now=start + 29.9)[0] == 0
    assert table.sweep(lim, now=start + 30.1)[0] == 1


def test_no_minimum_rate_leaves_only_the_silence_limit(pairs):
    table, lim = Connections(), limits(data_timeout=10.0, min_data_rate=0)
    _, watch, _ = table.admit("192.0.2.1", pairs()[0], lim)
    watch.asked(in_data=True)
    assert table.sweep(lim, now=watch.since + 10_000)[0] == 0


def test_elemtas_own_time_is_not_the_clients(pairs):
    table, lim = Connections(), limits(command_timeout=1.0)
    _, watch, _ = table.admit("192.0.2.1", pairs()[0], lim)
    watch.waiting = False  # a plugin or the commit is running
    assert table.sweep(lim, now=watch.since + 100)[0] == 0


def test_under_stress_untrusted_sessions_get_the_short_timeout(pairs):
    table, lim = Connections(), limits(stress_timeout=10.0, stress_at=3)
    watches = [table.admit(f"192.0.2.{n}", pairs()[0], lim)[1] for n in range(2)]
    trusted = table.admit("127.0.0.1", pairs()[0], lim, reserved=True, privileged=True)[1]
    now = max(w.since for w in [*watches, trusted]) + 11
    ended, stressed = table.sweep(lim, now=now)
    assert (ended, stressed) == (2, True)
    assert all(w.expired for w in watches) and not trusted.expired
    for n in (1, 2):  # closed sessions leave the table; below the mark stress ends, once
        table.release(n)
    assert table.sweep(lim, now=now) == (0, False)
    assert table.sweep(lim, now=now) == (0, None)


def test_without_stress_the_normal_timeouts_hold(pairs):
    table, lim = Connections(), limits(stress_timeout=10.0, stress_at=3)
    watches = [table.admit(f"192.0.2.{n}", pairs()[0], lim)[1] for n in range(2)]
    assert table.sweep(lim, now=watches[-1].since + 11) == (0, None)
    lim = limits(stress_timeout=0.0, stress_at=2)  # stress_timeout 0: no stress mode
    assert table.sweep(lim, now=watches[-1].since + 11)[0] == 0


def test_is_trusted_answers_by_network_and_keeps_a_bounded_cache(monkeypatch):
    import ipaddress

    from elemta.smtp import connections

    lim = limits(trusted=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")))
    for _ in range(2):  # the second round is answered from the cache, the same
        assert lim.is_trusted("192.0.2.7") and lim.is_trusted("2001:db8::1")
        assert not lim.is_trusted("198.51.100.7") and not lim.is_trusted("2001:db9::1")
    monkeypatch.setattr(connections, "TRUSTED_CACHE", 3)
    for last in range(10):
        assert not lim.is_trusted(f"203.0.113.{last}")
    assert len(lim._trusted_cache) <= 3
    assert lim.is_trusted("192.0.2.8")
