"""The DNSBL plugin against the loopback DNS server and the real cached resolver."""

from __future__ import annotations

import pytest

from elemta.dnscache import Resolver
from elemta.plugins import api
from elemta.plugins.builtin.dnsbl import DnsblPlugin, query_name
from tests.dnsserver import DnsServer

CLIENT = "192.0.2.10"
LISTED_NAME = "10.2.0.192"  # CLIENT's octets, reversed
V6_CLIENT = "2001:db8::1"
V6_NAME = ".".join("1" + "0" * 23 + "8bd01002")  # 2001:0db8:0000:...:0001, nibbles reversed


@pytest.fixture()
def server():
    with DnsServer() as dns_server:
        yield dns_server


@pytest.fixture()
def make(server, tmp_path):
    """make(**options) -> (started plugin, log lines)."""

    def make(**options):
        lines = []
        resolver = Resolver([server.nameserver], timeout=2)
        plugin = DnsblPlugin("dnsbl")
        plugin.configure({**DnsblPlugin.options, **options})
        plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path), dns=resolver,
                                  authserv_id="mx.test", log=lambda event, **kw: lines.append((event, kw))))
        return plugin, lines

    return make


def session(plugin, ip=CLIENT, role="mx", trusted=False, user=None):
    """Connect, authenticate as user (if any), try one recipient and send one message:
    (connection, verdicts of on_connect, on_rcpt_to, on_message)."""
    conn = api.Connection(ip=ip, role=role, trusted=trusted)
    at_connect = plugin.on_connect(api.Context("on_connect", connection=conn))
    conn.user = user
    tx = api.Transaction("Q1", "sender@example.org")
    at_rcpt = plugin.on_rcpt_to(api.Context("on_rcpt_to", connection=conn, transaction=tx,
                                            recipient="rcpt@example.net"))
    message = api.Message(b"Subject: hi\r\n\r\nbody\r\n")
    at_message = plugin.on_message(api.Context("on_message", connection=conn, transaction=tx, message=message))
    return conn, at_connect, at_rcpt, at_message


def refused(verdict, zones="bl.test") -> bool:
    return verdict == api.reject(554, "5.7.1", f"Service unavailable; client [{CLIENT}] listed by {zones}")


def test_query_names_reverse_octets_and_nibbles():
    assert query_name("192.0.2.10") == LISTED_NAME
    assert query_name("::ffff:192.0.2.10") == LISTED_NAME
    assert query_name(V6_CLIENT) == V6_NAME
    assert len(V6_NAME.split(".")) == 32


def test_listed_client_is_refused_at_rcpt_with_the_zone_named(server, make):
    server.add(f"{LISTED_NAME}.bl.test", "A", "127.0.0.2")
    plugin, lines = make(zones=[{"zone": "bl.test"}])
    conn, at_connect, at_rcpt, _ = session(plugin)
    assert at_connect is None  # reject_at = "rcpt": the log gets sender and recipient
    assert refused(at_rcpt)
    assert conn.notes["dnsbl"] == {"score": 1.0, "listed": ["bl.test"], "allowed": []}
    assert ("listed", {"plugin": "dnsbl", "ip": CLIENT, "score": 1.0, "listed": "bl.test", "allowed": ""}) in lines


def test_listed_client_is_refused_at_connect_when_asked(server, make):
    server.add(f"{LISTED_NAME}.bl.test", "A", "127.0.0.2")
    server.add(f"{LISTED_NAME}.other.test", "A", "127.0.0.4")
    plugin, _ = make(zones=[{"zone": "bl.test"}, {"zone": "other.test"}], reject_at="connect")
    _, at_connect, at_rcpt, _ = session(plugin)
    assert refused(at_connect, "bl.test, other.test")
    assert at_rcpt is None
    # Not at connect on a submission port: users there authenticate, and are not refused.
    _, at_connect, at_rcpt, _ = session(plugin, role="submission", user="alice")
    assert at_connect is None and at_rcpt is None


def test_unlisted_client_passes_untouched(make):
    plugin, _ = make(zones=[{"zone": "bl.test"}])
    conn, *verdicts = session(plugin)
    assert verdicts == [None, None, None]
    assert conn.notes["dnsbl"]["score"] == 0


def test_a_half_weight_listing_only_tags(server, make):
    server.add(f"{LISTED_NAME}.half.test", "A", "127.0.0.2")
    plugin, _ = make(zones=[{"zone": "half.test", "weight": 0.5}, {"zone": "bl.test"}])
    _, at_connect, at_rcpt, at_message = session(plugin)
    assert at_connect is None and at_rcpt is None
    assert at_message == api.proceed(add_headers=(("X-DNSBL", "score=0.5 listed=half.test"),))


def test_weights_add_up_to_a_refusal(server, make):
    for zone in ("a.test", "b.test", "c.test"):
        server.add(f"{LISTED_NAME}.{zone}", "A", "127.0.0.2")
    plugin, _ = make(zones=[{"zone": "a.test", "weight": 0.1}, {"zone": "b.test", "weight": 0.2},
                            {"zone": "c.test", "weight": 0.7}])
    assert refused(session(plugin)[2], "a.test, b.test, c.test")


def test_an_allow_list_cancels_a_listing(server, make):
    server.add(f"{LISTED_NAME}.bl.test", "A", "127.0.0.2")
    server.add(f"{LISTED_NAME}.wl.test", "A", "127.0.10.3")
    plugin, _ = make(zones=[{"zone": "bl.test"}], allow_zones=[{"zone": "wl.test", "weight": 1}])
    conn, *verdicts = session(plugin)
    assert verdicts == [None, None, None]
    assert conn.notes["dnsbl"] == {"score": 0.0, "listed": ["bl.test"], "allowed": ["wl.test"]}
    # Half cancelled: still tagged, and the header says which allow list counted.
    plugin, _ = make(zones=[{"zone": "bl.test"}], allow_zones=[{"zone": "wl.test", "weight": 0.4}])
    assert session(plugin)[3].add_headers == (("X-DNSBL", "score=0.6 listed=bl.test allowed=wl.test"),)


def test_codes_select_which_answers_count(server, make):
    server.add(f"{LISTED_NAME}.zen.test", "A", "127.0.0.10")  # say, a policy listing
    plugin, _ = make(zones=[{"zone": "zen.test", "codes": ["127.0.0.2", "127.0.0.3"]}])
    assert session(plugin)[2] is None
    server.add(f"{LISTED_NAME}.zen.test", "A", "127.0.0.3")
    plugin, _ = make(zones=[{"zone": "zen.test", "codes": ["127.0.0.2", "127.0.0.3"]}])
    assert refused(session(plugin)[2], "zen.test")


def test_refused_query_and_reserved_answers_are_no_listing(server, make):
    server.add(f"{LISTED_NAME}.busy.test", "A", "127.255.255.254")
    server.add(f"{LISTED_NAME}.broken.test", "A", "127.0.0.1")
    server.add(f"{LISTED_NAME}.hijacked.test", "A", "198.51.100.1")
    plugin, lines = make(zones=[{"zone": "busy.test"}, {"zone": "broken.test"}, {"zone": "hijacked.test"}])
    conn, *verdicts = session(plugin)
    assert verdicts == [None, None, None]
    assert conn.notes["dnsbl"]["listed"] == []
    assert [(event, kw["zone"], kw["answer"]) for event, kw in lines] == [
        ("zone_refused", "busy.test", "127.255.255.254"),
        ("bad_answer", "broken.test", "127.0.0.1"),
        ("bad_answer", "hijacked.test", "198.51.100.1"),
    ]


def test_ipv6_clients_are_looked_up_by_nibbles(server, make):
    server.add(f"{V6_NAME}.bl.test", "A", "127.0.0.2")
    plugin, _ = make(zones=[{"zone": "bl.test"}])
    verdict = session(plugin, ip=V6_CLIENT)[2]
    assert verdict.action == "reject" and f"[{V6_CLIENT}] listed by bl.test" in verdict.text
    assert server.queries(f"{V6_NAME}.bl.test", "A") == 1


def test_a_failing_zone_is_skipped(server, make):
    server.add(f"{LISTED_NAME}.bl.test", "A", "127.0.0.2")
    server.fail(f"{LISTED_NAME}.down.test", "servfail")
    plugin, lines = make(zones=[{"zone": "down.test"}, {"zone": "bl.test", "weight": 0.5}])
    _, _, at_rcpt, at_message = session(plugin)
    assert at_rcpt is None and at_message.add_headers == (("X-DNSBL", "score=0.5 listed=bl.test"),)
    assert lines[0][0] == "dns_error" and lines[0][1]["zone"] == "down.test"


def test_trusted_and_authenticated_clients_are_exempt(server, make):
    server.add(f"{LISTED_NAME}.bl.test", "A", "127.0.0.2")
    plugin, _ = make(zones=[{"zone": "bl.test"}])
    conn, *verdicts = session(plugin, trusted=True)
    assert verdicts == [None, None, None] and "dnsbl" not in conn.notes
    assert server.queries() == 0  # not even looked up
    conn, *verdicts = session(plugin, user="alice")
    assert verdicts == [None, None, None] and conn.notes["dnsbl"]["score"] == 1.0
    plugin, _ = make(zones=[{"zone": "bl.test"}], reject_at="connect")
    assert session(plugin, trusted=True)[1] is None


def test_a_second_connection_is_answered_from_the_dns_cache(server, make):
    server.add(f"{LISTED_NAME}.bl.test", "A", "127.0.0.2")
    plugin, _ = make(zones=[{"zone": "bl.test"}, {"zone": "clean.test"}])
    assert refused(session(plugin)[2])
    assert refused(session(plugin)[2])
    assert server.queries(f"{LISTED_NAME}.bl.test", "A") == 1
    assert server.queries(f"{LISTED_NAME}.clean.test", "A") == 1  # NXDOMAIN is cached too


def test_no_resolver_no_start(tmp_path):
    plugin = DnsblPlugin("dnsbl")
    plugin.configure({**DnsblPlugin.options, "zones": [{"zone": "bl.test"}]})
    with pytest.raises(api.PluginError, match="^zones: "):
        plugin.start(api.Services(hostname="mx.test", spool_dir=str(tmp_path)))


@pytest.mark.parametrize("options, message", [
    ({"zones": "bl.test"}, "zones: "),
    ({"zones": ["bl.test"]}, r"zones\[0\]: "),
    ({"zones": [{"zone": "bl.test"}, {"weight": 1}]}, r"zones\[1\]\.zone: "),
    ({"zones": [{"zone": "bad..name"}]}, r"zones\[0\]\.zone: "),
    ({"zones": [{"zone": "bl.test", "weight": 0}]}, r"zones\[0\]\.weight: "),
    ({"zones": [{"zone": "bl.test", "weight": "1"}]}, r"zones\[0\]\.weight: "),
    ({"zones": [{"zone": "bl.test", "codes": ["10.0.0.2"]}]}, r"zones\[0\]\.codes: "),
    ({"zones": [{"zone": "bl.test", "codes": "127.0.0.2"}]}, r"zones\[0\]\.codes: "),
    ({"zones": [{"zone": "bl.test", "score": 1}]}, r"zones\[0\]: unknown key 'score'"),
    ({"allow_zones": [{"zone": "wl.test", "weight": -1}]}, r"allow_zones\[0\]\.weight: "),
    ({"reject_score": 0}, "reject_score: "),
    ({"tag_score": float("nan")}, "tag_score: "),
    ({"reject_at": "data"}, "reject_at: "),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(api.PluginError, match=f"^{message}"):
        DnsblPlugin("dnsbl").configure({**DnsblPlugin.options, **options})
