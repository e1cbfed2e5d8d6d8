"""The plugin manager: order, verdicts, isolation of failures and hangs, statistics."""

from __future__ import annotations

import email.utils
import threading

import pytest

from elemta.config import PluginSpec
from elemta.errors import ConfigError
from elemta.plugins import api
from elemta.plugins.manager import FAIL_CLOSED, Manager, checked_options, load_class
from tests.plugins import sample
from tests.support import wait_for

S = "tests.plugins.sample:"


def spec(use, name="", **kw):
    return PluginSpec(use=use, name=name or use.rpartition(":")[2].lower(), **kw)


def ctx(hook="on_mail_from"):
    return api.Context(hook, api.Connection("192.0.2.1"), api.Transaction("Q1", "a@example.com"))


@pytest.fixture()
def manager_of():
    sample.RELEASE.clear()  # another test may have left it set: Hangs must hang
    made = []

    def make(*specs):
        manager = Manager(tuple(specs))
        manager.start(api.Services(hostname="mx.test", spool_dir="/nonexistent"))
        made.append(manager)
        return manager

    yield make
    sample.RELEASE.set()  # let hung calls return before the next test
    for manager in made:
        manager.stop()
    sample.RELEASE.clear()


def hook_stats(manager, name, hook):
    return next(p for p in manager.stats() if p["name"] == name)["hooks"][hook]


def test_without_a_timeout_in_the_config_the_plugin_class_decides(manager_of):
    manager = manager_of(spec(S + "Threads", "pooled"), spec(S + "InlineThreads", "inline"),
                         spec(S + "InlineThreads", "isolated", timeout=5.0), spec(S + "Threads", "forced", timeout=0))
    context = ctx()
    manager.run("on_mail_from", context)
    me, ran = threading.get_ident(), context.transaction.notes
    assert ran["inline"] == me and ran["forced"] == me
    assert ran["pooled"] != me and ran["isolated"] != me
    timeouts = {p["name"]: p["timeout"] for p in manager.stats()}
    assert timeouts == {"pooled": 30.0, "inline": 0.0, "isolated": 5.0, "forced": 0}


def test_the_built_ins_run_in_the_callers_thread_by_default():
    for use in ("ratelimit", "greylist", "dnsbl", "spf", "dkim", "dmarc"):
        assert load_class(use).default_timeout == 0, use


def test_no_plugins_is_nothing(manager_of):
    manager = manager_of()
    assert not manager.wants("on_mail_from")
    assert manager.run("on_mail_from", ctx()).action == "continue"


def test_plugins_run_in_order_and_gather_headers_and_results(manager_of):
    manager = manager_of(spec(S + "Tagger", "one", options={"header": "X-One"}),
                         spec(S + "Tagger", "two", options={"header": "X-Two"}, timeout=0))
    c = ctx()
    out = manager.run("on_mail_from", c)
    assert out.action == "continue"
    assert out.add_headers == [("X-One", "by one"), ("X-Two", "by two")]
    assert out.auth_results == ["x-one=pass", "x-two=pass"]
    assert c.auth_results == ["x-one=pass", "x-two=pass"]


def test_later_plugins_see_the_earlier_auth_results(manager_of):
    manager = manager_of(spec(S + "Tagger", "one"), spec(S + "Tagger", "two"))
    c = ctx("on_message")
    c.auth_results = ["spf=pass smtp.mailfrom=a@example.com"]
    out = manager.run("on_message", c)
    assert out.auth_results == ["x-seen=1", "x-seen=2"]
    assert out.priority == "high"


@pytest.mark.parametrize("action", ["accept", "reject", "defer", "discard", "quarantine"])
def test_a_final_verdict_stops_the_later_plugins(manager_of, action):
    manager = manager_of(spec(S + "Tagger", "first", options={"rcpt_verdict": action}), spec(S + "Recorder"))
    sample.Recorder.seen = []
    c = ctx("on_rcpt_to")
    c.recipient = "b@example.org"
    out = manager.run("on_rcpt_to", c)
    assert out.action == action and out.plugin == "first"
    assert sample.Recorder.seen == []


@pytest.mark.parametrize("timeout", [5.0, 0.0])
def test_an_exception_is_skipped_when_fail_open(manager_of, timeout):
    manager = manager_of(spec(S + "Raises", timeout=timeout), spec(S + "Tagger"))
    out = manager.run("on_mail_from", ctx())
    assert out.action == "continue" and out.add_headers == [("X-Tagged", "by tagger")]
    stats = hook_stats(manager, "raises", "on_mail_from")
    assert stats["calls"] == 1 and stats["errors"] == 1 and stats["timeouts"] == 0
    assert "RuntimeError: plugin bug" in manager.stats()[0]["last_error"]


@pytest.mark.parametrize("timeout", [5.0, 0.0])
def test_an_exception_gives_451_when_fail_closed(manager_of, timeout):
    manager = manager_of(spec(S + "Raises", timeout=timeout, fail_closed=True), spec(S + "Tagger"))
    out = manager.run("on_mail_from", ctx())
    assert out.verdict == FAIL_CLOSED and (out.verdict.code, out.verdict.esc) == (451, "4.3.0")
    assert out.add_headers == []  # Tagger never ran
    assert hook_stats(manager, "raises", "on_mail_from")["verdicts"] == {"defer": 1}


def test_a_hung_plugin_is_left_behind_fail_open(manager_of):
    manager = manager_of(spec(S + "Hangs", timeout=0.2), spec(S + "Tagger"))
    out = manager.run("on_mail_from", ctx())
    assert out.action == "continue"
    assert out.add_headers == [("X-Tagged", "by tagger")]  # the next plugin still ran
    stats = hook_stats(manager, "hangs", "on_mail_from")
    assert stats["timeouts"] == 1 and stats["errors"] == 0
    sample.RELEASE.set()  # the late verdict (a reject) must not land anywhere
    assert out.action == "continue"


def test_a_hung_plugin_gives_451_fail_closed(manager_of):
    manager = manager_of(spec(S + "Hangs", timeout=0.2, fail_closed=True), spec(S + "Tagger"))
    out = manager.run("on_mail_from", ctx())
    assert (out.action, out.verdict.code, out.plugin) == ("defer", 451, "hangs")


def test_calls_beyond_the_cap_fail_at_once_while_the_others_hang(manager_of):
    manager = manager_of(spec(S + "Hangs", timeout=0.2, max_concurrency=2))
    for _ in range(3):
        manager.run("on_mail_from", ctx())
    stats = hook_stats(manager, "hangs", "on_mail_from")
    assert stats["timeouts"] == 3 and stats["calls"] == 3
    assert "too many calls in flight" in manager.stats()[0]["last_error"]


def test_a_hung_plugin_does_not_delay_concurrent_sessions_past_its_timeout(manager_of):
    manager = manager_of(spec(S + "Hangs", timeout=0.2))
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(manager.run("on_mail_from", ctx())))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [o.action for o in outcomes] == ["continue"] * 8


def test_garbage_is_an_error(manager_of):
    manager = manager_of(spec(S + "Garbage", fail_closed=True))
    assert manager.run("on_mail_from", ctx()).action == "defer"
    assert manager.run("on_helo", ctx("on_helo")).action == "defer"
    stats = manager.stats()[0]
    assert stats["hooks"]["on_mail_from"]["errors"] == 1
    assert "not a verdict on_helo may give" in stats["last_error"]


def test_notice_hooks_are_counted_but_change_nothing(manager_of):
    manager = manager_of(spec(S + "Recorder"))
    sample.Recorder.seen = []
    out = manager.run("on_enqueue", ctx("on_enqueue"))
    assert out.action == "continue" and sample.Recorder.seen[0][0] == "on_enqueue"
    assert hook_stats(manager, "recorder", "on_enqueue")["calls"] == 1


def test_statistics_count_calls_verdicts_and_time(manager_of):
    manager = manager_of(spec(S + "Tagger", options={"rcpt_verdict": "defer"}))
    for _ in range(3):
        manager.run("on_mail_from", ctx())
        manager.run("on_rcpt_to", ctx("on_rcpt_to"))
    stats = manager.stats()[0]
    assert stats["health"] == "ok"
    assert stats["hooks"]["on_mail_from"]["calls"] == 3
    assert stats["hooks"]["on_mail_from"]["verdicts"] == {"continue": 3}
    assert stats["hooks"]["on_rcpt_to"]["verdicts"] == {"defer": 3}
    assert stats["hooks"]["on_rcpt_to"]["seconds"] >= 0
    assert set(stats["hooks"]) == {"on_mail_from", "on_rcpt_to", "on_message"}


def test_disabled_plugins_are_not_loaded(manager_of):
    manager = manager_of(spec(S + "Raises", enabled=False))
    assert manager.plugins == []


@pytest.mark.parametrize("use, message", [
    ("nosuch.module:Thing", "cannot import nosuch.module"),
    ("tests.plugins.sample:threading", "is not a subclass"),
    ("no-such-entry-point", "no elemta.plugins entry point"),
])
def test_unloadable_plugins_are_config_errors(use, message):
    with pytest.raises(ConfigError, match=message):
        load_class(use)


def test_options_are_checked_against_the_defaults():
    assert checked_options("p", {"a": 1.0, "b": "x"}, {"a": 2}) == {"a": 2.0, "b": "x"}
    with pytest.raises(ConfigError, match=r"p\.c: unknown option \(allowed: a, b\)"):
        checked_options("p", {"a": 1.0, "b": "x"}, {"c": 1})
    with pytest.raises(ConfigError, match=r"p\.b: expected str, got int"):
        checked_options("p", {"a": 1.0, "b": "x"}, {"b": 1})


def test_a_plugin_refusing_its_options_names_the_option():
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.options\.rcpt_verdict: not a verdict"):
        Manager((spec(S + "Tagger", options={"rcpt_verdict": "maybe"}),))


@pytest.mark.parametrize("make", [
    lambda: api.reject(450, "4.7.1", "x"),
    lambda: api.defer(550, "5.7.1", "x"),
    lambda: api.reject(550, "4.7.1", "x"),
    lambda: api.reject(550, "5.7.1", "two\r\nlines"),
    lambda: api.proceed(add_headers=(("Bad Name", "v"),)),
    lambda: api.proceed(add_headers=(("X-A", "v\r\nInjected: yes"),)),
    lambda: api.proceed(priority="urgent"),
    lambda: api.proceed(auth_results=("spf=pass; dkim=pass",)),
    lambda: api.Verdict("maybe"),
])
def test_bad_verdicts_cannot_be_made(make):
    with pytest.raises(ValueError, match="bad verdict"):
        make()


def test_a_folded_header_value_is_allowed():
    assert api.proceed(add_headers=(("X-A", "one\r\n\ttwo"),)).add_headers


def test_network_of():
    assert api.network_of("192.0.2.77") == "192.0.2.0/24"
    assert api.network_of("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"
    assert api.network_of("::ffff:192.0.2.9") == "192.0.2.0/24"
    with pytest.raises(ValueError, match="not an IP address"):
        api.network_of("unix")


def test_client_address():
    assert str(api.client_address("::ffff:192.0.2.9")) == "192.0.2.9"
    assert str(api.client_address("2001:db8::1")) == "2001:db8::1"
    assert api.client_address("") is None and api.client_address("local") is None


# The fast path for plain From values must find what email.utils finds, and leave the rest to it.
FROM_VALUES = [
    "a@b.example", "<a@b.example>", "Some Name <a@b.example>", " Joe  Q. <x.y@Sub.B.example.> ",
    '"Quoted, Name" <q@c.example>', "a@b.example, c@d.example", "Name <a@b.example", "a@b.example>",
    "(comment) a@b.example", "group: a@b.example;", "undisclosed", "<@route:a@b.example>",
    "a@[192.0.2.1]", "x <a@b.example> y", "Ünïcode <u@b.example>", "a@b.example (Name)",
]


@pytest.mark.parametrize("value", FROM_VALUES)
def test_from_domains_matches_the_email_package(value):
    expected = [address.rpartition("@")[2].lower().rstrip(".")
                for _, address in email.utils.getaddresses([value]) if "@" in address]
    assert api.Message(f"From: {value}\r\n\r\nbody".encode()).from_domains() == expected


def test_message_fields():
    m = api.Message(b"From: A <a@Example.COM>\r\nSubject: one\r\n two\r\nFrom: b@other.test\r\n\r\nbody\r\n")
    assert m.get("subject") == "one two"
    assert m.from_domains() == ["example.com", "other.test"]
    assert m.body == b"body\r\n"


def test_a_stuck_health_check_does_not_stall_stats(manager_of):
    manager = manager_of(spec(S + "SlowHealth"), spec(S + "Tagger"))
    manager.health_timeout = 0.1
    health = {p["name"]: p["health"] for p in manager.stats()}
    assert health == {"slowhealth": "health() did not answer within 0.1 s", "tagger": "ok"}
    # Still stuck: reported as such, and no second call piles up behind the first.
    assert manager.stats()[0]["health"].startswith("health() has not answered for")
    sample.RELEASE.set()
    wait_for(lambda: manager.stats()[0]["health"] == "backend unreachable", 5, what="the health answer")


@pytest.mark.parametrize("timeout", [0, 5.0])  # in the caller's thread, and in a pool thread
def test_a_plugins_log_lines_carry_the_queue_id_of_the_hook(timeout):
    lines = []
    manager = Manager((spec("tests.plugins.sample:Logs", timeout=timeout),))
    manager.start(api.Services(hostname="mx.test", spool_dir="/nonexistent",
                               log=lambda event, qid=None, **fields: lines.append((qid, event, fields["hook"]))))
    try:
        manager.run("on_connect", api.Context("on_connect", api.Connection("192.0.2.1")))
        manager.run("on_mail_from", ctx("on_mail_from"))
        delivery = api.Delivery("Q2", "a@example.com", ("b@example.net",))
        manager.run("on_delivery_success", api.Context("on_delivery_success", delivery=delivery))
    finally:
        manager.stop()
    assert lines == [(None, "seen", "on_connect"), ("Q1", "seen", "on_mail_from"),
                     ("Q2", "seen", "on_delivery_success")]
