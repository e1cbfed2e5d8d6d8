"""The ratelimit plugin: its rules over the core's RateLimit, with a fake clock instead of sleeps."""

from __future__ import annotations

import pytest

from elemta.plugins import api
from elemta.plugins.builtin.ratelimit import RatelimitPlugin
from tests.support import Clock


@pytest.fixture()
def clock():
    return Clock(5000.0)


@pytest.fixture()
def make(tmp_path, clock):
    def make(*rules, **options):
        lines = []
        plugin = RatelimitPlugin("ratelimit", now=clock)
        plugin.configure({**RatelimitPlugin.options, "rules": list(rules), **options})
        plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path),
                                  log=lambda event, **kw: lines.append((event, kw))))
        plugin.lines = lines
        return plugin

    return make


def message(plugin, ip="192.0.2.1", sender="alice@example.org", recipients=("bob@example.net",),
            user=None, trusted=False):
    """One transaction: the first refusal (of MAIL or of an RCPT), or None if all passed."""
    conn = api.Connection(ip=ip, user=user, trusted=trusted)
    tx = api.Transaction("Q1", sender)
    verdict = plugin.on_mail_from(api.Context("on_mail_from", connection=conn, transaction=tx))
    if verdict is not None:
        return verdict
    refusals = []
    for recipient in recipients:
        verdict = plugin.on_rcpt_to(api.Context("on_rcpt_to", connection=conn, transaction=tx, recipient=recipient))
        if verdict is None:
            tx.recipients.append(recipient)
        else:
            refusals.append(verdict)
    return refusals[0] if refusals else None


def deferred(verdict, text=None) -> bool:
    ok = verdict is not None and (verdict.action, verdict.code, verdict.esc) == ("defer", 450, "4.7.1")
    return ok and (text is None or text in verdict.text)


# What each key counts by: two messages that share it, and one that does not.
CASES = {
    "ip": ({"ip": "192.0.2.1"}, {"ip": "192.0.2.1", "sender": "x@other.example"}, {"ip": "192.0.2.2"}),
    "sender": ({"sender": "alice@example.org"}, {"sender": "Alice@EXAMPLE.org", "ip": "192.0.2.9"},
               {"sender": "carol@example.org"}),
    "sender_domain": ({"sender": "alice@example.org"}, {"sender": "carol@Example.ORG"},
                      {"sender": "alice@example.com"}),
    "user": ({"user": "alice"}, {"user": "Alice", "ip": "192.0.2.9"}, {"user": "carol"}),
    "recipient_domain": ({"recipients": ["a@example.net"]}, {"recipients": ["b@EXAMPLE.net"]},
                         {"recipients": ["a@example.com"]}),
}


@pytest.mark.parametrize("key", sorted(CASES))
def test_each_key_hits_its_limit_and_recovers(make, clock, key):
    first, same, other = CASES[key]
    plugin = make({"key": key, "limit": 3, "window": 60})
    assert [message(plugin, **first) for _ in range(2)] == [None, None]
    assert message(plugin, **same) is None  # the third, by the same key
    verdict = message(plugin, **same)
    assert deferred(verdict, f"Rate limit 3 messages per 60 seconds per {key.replace('_', ' ')} exceeded")
    assert verdict.text.endswith("try again in 20 seconds")  # one message drains in 60/3 s
    assert message(plugin, **other) is None  # another key has its own allowance
    clock.advance(19)
    assert deferred(message(plugin, **first), "try again in 1 seconds")
    clock.advance(1)
    assert message(plugin, **first) is None
    assert deferred(message(plugin, **first))
    clock.advance(60)
    assert [message(plugin, **first) for _ in range(3)] == [None] * 3  # the whole allowance is back
    assert deferred(message(plugin, **first))


def test_refusals_are_logged_with_the_rule(make):
    plugin = make({"key": "ip", "limit": 1, "window": 3600})
    message(plugin)
    message(plugin)
    assert plugin.lines == [("limited", {"plugin": "ratelimit", "rule": 0, "key": "ip", "value": "192.0.2.1",
                                         "retry": 3600})]


def test_recipient_domain_counts_each_domain_apart(make):
    plugin = make({"key": "recipient_domain", "limit": 2, "window": 3600, "count": "recipients"})
    assert message(plugin, recipients=["a@one.example", "b@one.example", "a@two.example"]) is None
    verdict = message(plugin, recipients=["c@one.example", "b@two.example"])
    assert deferred(verdict, "Rate limit 2 recipients per 3600 seconds per recipient domain exceeded")
    # two.example had one left, which the second message used.
    assert deferred(message(plugin, recipients=["c@two.example"]))
    assert message(plugin, recipients=["a@three.example", "postmaster"]) is None  # no domain: not counted


def test_recipient_domain_messages_count_a_message_once_per_domain(make):
    plugin = make({"key": "recipient_domain", "limit": 2, "window": 3600, "count": "messages"})
    assert message(plugin, recipients=["a@one.example", "b@one.example", "c@one.example"]) is None
    assert message(plugin, recipients=["a@one.example", "a@two.example"]) is None
    verdict = message(plugin, recipients=["d@one.example", "b@two.example"])
    assert deferred(verdict, "per recipient domain") and "2 messages" in verdict.text


def test_recipient_rules_count_at_each_rcpt(make):
    plugin = make({"key": "ip", "limit": 5, "window": 3600, "count": "recipients"})
    assert message(plugin, recipients=[f"r{n}@example.net" for n in range(4)]) is None
    assert deferred(message(plugin, recipients=["r5@example.net", "r6@example.net"]), "5 recipients")


def test_a_refused_command_is_not_counted_by_the_other_rules(make):
    plugin = make({"key": "ip", "limit": 10, "window": 3600}, {"key": "sender", "limit": 1, "window": 3600})
    assert message(plugin) is None
    for _ in range(5):
        assert deferred(message(plugin), "per sender")
    # Only the one allowed message was counted for the address: nine more may come.
    assert [message(plugin, sender=f"s{n}@example.org") for n in range(9)] == [None] * 9
    assert deferred(message(plugin, sender="z@example.org"), "per ip")


def test_null_sender_and_anonymous_clients_escape_rules_that_do_not_apply(make):
    plugin = make({"key": "sender", "limit": 1, "window": 3600}, {"key": "sender_domain", "limit": 1, "window": 3600},
                  {"key": "user", "limit": 1, "window": 3600})
    assert [message(plugin, sender="") for _ in range(3)] == [None] * 3


def test_trusted_clients_skip_unless_told_otherwise(make):
    plugin = make({"key": "ip", "limit": 1, "window": 3600})
    assert [message(plugin, trusted=True) for _ in range(3)] == [None] * 3
    plugin = make({"key": "ip", "limit": 1, "window": 3600}, skip_trusted=False)
    assert message(plugin, trusted=True) is None
    assert deferred(message(plugin, trusted=True))


def test_max_keys_bounds_each_rule(make):
    plugin = make({"key": "sender", "limit": 5, "window": 3600}, max_keys=10)
    for n in range(50):
        message(plugin, sender=f"s{n}@example.org")
    assert len(plugin.rules[0].table) == 10


@pytest.mark.parametrize("rules, message", [
    ("ip", "rules: "),
    (["ip"], r"rules\[0\]: "),
    ([{"key": "ip", "limit": 1}, {"key": "helo", "limit": 1}], r"rules\[1\]\.key: "),
    ([{"key": "ip"}], r"rules\[0\]\.limit: "),
    ([{"key": "ip", "limit": 0}], r"rules\[0\]\.limit: "),
    ([{"key": "ip", "limit": 2.5}], r"rules\[0\]\.limit: "),
    ([{"key": "ip", "limit": True}], r"rules\[0\]\.limit: "),
    ([{"key": "ip", "limit": 1, "window": 0}], r"rules\[0\]\.window: "),
    ([{"key": "ip", "limit": 1, "window": "1h"}], r"rules\[0\]\.window: "),
    ([{"key": "ip", "limit": 1}, {"key": "ip", "limit": 1}, {"key": "ip", "limit": 1, "count": "octets"}],
     r"rules\[2\]\.count: "),
    ([{"key": "ip", "limit": 1, "per": "hour"}], r"rules\[0\]: unknown key 'per'"),
])
def test_bad_rules_are_refused_naming_the_rule(rules, message):
    with pytest.raises(api.PluginError, match=f"^{message}"):
        RatelimitPlugin("ratelimit").configure({**RatelimitPlugin.options, "rules": rules})


@pytest.mark.parametrize("options, name", [({"max_keys": 0}, "max_keys"), ({"skip_trusted": 1}, "skip_trusted")])
def test_bad_options_are_refused_by_name(options, name):
    with pytest.raises(api.PluginError, match=f"^{name}: "):
        RatelimitPlugin("ratelimit").configure({**RatelimitPlugin.options, **options})


def test_without_shared_memory_each_worker_keeps_an_even_share_of_the_limit(tmp_path):
    plugin = RatelimitPlugin("ratelimit")
    plugin.configure({"rules": [{"key": "ip", "limit": 5, "window": 3600}]})
    plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path), workers=2))
    assert [r.limit for r in plugin.rules] == [3]


def test_with_shared_memory_the_workers_count_together(tmp_path, clock):
    from elemta.assemble import _shared_rate_limit
    from elemta.shm import Region

    factory = _shared_rate_limit(Region(1 << 22))  # what the daemon lends each worker
    workers = []
    for _ in range(2):  # two workers' instances of the same plugin
        plugin = RatelimitPlugin("ratelimit", now=clock)
        plugin.configure({"rules": [{"key": "ip", "limit": 5, "window": 3600}], "max_keys": 1000})
        plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path), workers=2, rate_limit=factory))
        workers.append(plugin)
    assert [r.limit for r in workers[0].rules] == [5]  # the limit as written
    outcomes = [message(workers[n % 2]) for n in range(6)]
    assert outcomes[:5] == [None] * 5 and deferred(outcomes[5], "5 messages per 3600 seconds per ip")
