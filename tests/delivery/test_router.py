"""elemta.delivery.router: the next hop of each recipient, with DNS from tests.dnsserver on 127.0.0.1."""

import pytest

from elemta import config
from elemta.delivery.dns import DnsError, Resolver
from elemta.delivery.router import Route, Router, read_auth_file
from elemta.errors import ConfigError
from elemta.local import LocalRecipients
from tests.dnsserver import DnsServer

RECORDS = {
    "example.test": [("MX", (20, "mx2.example.test"), 300), ("MX", (10, "mx1.example.test"), 300)],
    "mx1.example.test": [("A", "127.0.0.1", 300)],
    "mx2.example.test": [("A", "127.0.0.2", 300)],
    # the same two hosts in the other order of preference
    "same.test": [("MX", (5, "MX2.example.test."), 300), ("MX", (7, "mx1.example.test"), 300)],
    "other.test": [("MX", (10, "mx.other.test"), 300)],
    "mx.other.test": [("A", "127.0.0.3", 300)],
    "secure.test": [("MX", (10, "mx1.example.test"), 300)],
    "corp.test": [("MX", (10, "mx1.example.test"), 300)],
    "nullmx.test": [("MX", (0, "."), 300)],
}
LOCAL = {"smtp": {"local_domains": ["local.test", "Other.Local.TEST."]}}


@pytest.fixture(scope="module")
def server():
    with DnsServer(RECORDS) as srv:
        yield srv


@pytest.fixture
def make_router(server):
    def make(data=None, recipients=None):
        cfg = config.parse(data or {})
        return Router(cfg, Resolver([server.nameserver], timeout=5.0), recipients)
    return make


def merged(*parts):
    result: dict = {}
    for part in parts:
        for section, keys in part.items():
            result.setdefault(section, {}).update(keys)
    return result


# -- 1. local domains ---------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "expected"), [
    (None, Route("lmtp", path="/run/dovecot/lmtp", port=0, tls_policy="none")),  # the default
    ("lmtp:unix:/var/run/lmtp.sock", Route("lmtp", path="/var/run/lmtp.sock", port=0, tls_policy="none")),
    ("lmtp:127.0.0.1:2424", Route("lmtp", ("127.0.0.1",), 2424, tls_policy="none")),
    ("lmtp:[::1]", Route("lmtp", ("::1",), 24, tls_policy="none")),
    ("maildir:/var/mail/%d/%u", Route("maildir", path="/var/mail/%d/%u")),
    ("smtp:[127.0.0.1]:2525", Route("smtp", ("127.0.0.1",), 2525, tls_policy="dane")),
    ("hold", Route("hold")),
    ("discard", Route("discard")),
    ("error:4.3.2 mailbox server moving", Route("error", status="4.3.2", text="mailbox server moving")),
])
def test_local_domain_goes_to_local_transport_without_dns(make_router, server, transport, expected):
    data = merged(LOCAL, {"local": {"transport": transport}} if transport else {})
    router = make_router(data)
    before = server.queries()
    for address in ("alice@local.test", "Bob@LOCAL.test.", "carol@other.local.test"):
        assert router.route(address) == expected
    assert server.queries() == before


def test_local_smtp_transport_uses_the_domains_tls_policy(make_router):
    router = make_router(merged(LOCAL, {
        "local": {"transport": "smtp:[127.0.0.1]:2525"},
        "delivery": {"tls_policy": "encrypt", "tls_policies": {"Local.Test": "verify"}},
    }))
    assert router.route("alice@local.test").tls_policy == "verify"
    assert router.route("alice@other.local.test").tls_policy == "encrypt"


def test_local_alias_is_an_expand_route_with_its_final_addresses(make_router):
    router = make_router(merged(LOCAL, {"local": {
        "recipients": ["alice@local.test"],
        "aliases": {"sales": "alice@local.test, partner@example.test", "info@local.test": "sales@local.test"},
    }}))
    expected = Route("expand", targets=("alice@local.test", "partner@example.test"))
    assert router.route("sales@local.test") == expected
    assert router.route("Sales@Other.Local.Test") == expected
    assert router.route("info@local.test") == expected


def test_unknown_local_user_is_an_error_5_1_1(make_router):
    router = make_router(merged(LOCAL, {"local": {"recipients": ["alice@local.test"]}}))
    route = router.route("mallory@local.test")
    assert (route.kind, route.status) == ("error", "5.1.1")
    assert "<mallory@local.test>" in route.text
    assert router.route("alice@local.test").kind == "lmtp"


def test_postmaster_is_delivered_locally_or_to_the_configured_postmaster(make_router):
    listed = {"local": {"recipients": ["alice@local.test"]}}
    plain = make_router(merged(LOCAL, listed))
    assert plain.route("postmaster@other.local.test") == Route("lmtp", path="/run/dovecot/lmtp", port=0,
                                                               tls_policy="none")
    redirected = make_router(merged(LOCAL, listed, {"local": {"postmaster": "alice@local.test"}}))
    assert redirected.route("PostMaster@local.test") == Route("expand", targets=("alice@local.test",))


def test_local_domains_win_over_transport_map_and_relayhost(make_router):
    router = make_router(merged(LOCAL, {"delivery": {
        "transport": {"local.test": "discard"}, "relayhost": "[127.0.0.1]:2525"}}))
    assert router.route("alice@local.test").kind == "lmtp"


def test_recipients_table_may_be_given_instead_of_read_from_config(make_router):
    table = LocalRecipients(["elsewhere.test"], ["bob@elsewhere.test"])
    router = make_router(LOCAL, recipients=table)
    assert router.route("bob@elsewhere.test").kind == "lmtp"
    assert router.route("eve@elsewhere.test").status == "5.1.1"


# -- 2. transport map -------------------------------------------------------------------------

MAP = {"delivery": {"transport": {
    "partner.test": "smtp:[127.0.0.1]:2525",
    ".corp.test": "smtp:relay.corp.test:26",
    ".a.corp.test": "smtp:[127.0.0.9]",
    "b.corp.test": "lmtp:127.0.0.1:24",
    "Held.Test.": "hold",
    "void.test": "discard",
    "gone.test": "error:5.1.2 domain retired",
    "quiet.test": "error:5.7.1",
    "later.test": "error:4.4.1",
    "box.test": "maildir:/srv/mail/%d/%u",
}}}


@pytest.mark.parametrize(("address", "expected"), [
    ("x@partner.test", Route("smtp", ("127.0.0.1",), 2525, tls_policy="dane")),
    ("x@PARTNER.Test.", Route("smtp", ("127.0.0.1",), 2525, tls_policy="dane")),
    ("x@a.corp.test", Route("smtp", ("relay.corp.test",), 26, tls_policy="dane")),  # not ".a.corp.test"
    ("x@deep.down.corp.test", Route("smtp", ("relay.corp.test",), 26, tls_policy="dane")),
    ("x@z.a.corp.test", Route("smtp", ("127.0.0.9",), 25, tls_policy="dane")),  # nearest parent wins
    ("x@b.corp.test", Route("lmtp", ("127.0.0.1",), 24, tls_policy="none")),  # exact beats parent
    ("x@held.test", Route("hold")),
    ("x@void.test", Route("discard")),
    ("x@gone.test", Route("error", status="5.1.2", text="domain retired")),
    ("x@quiet.test", Route("error", status="5.7.1", text="delivery refused by transport map")),
    ("x@later.test", Route("error", status="4.4.1", text="delivery refused by transport map")),
    ("x@box.test", Route("maildir", path="/srv/mail/%d/%u")),
])
def test_transport_map_by_exact_domain_then_parent_domain(make_router, server, address, expected):
    router = make_router(MAP)
    before = server.queries()
    assert router.route(address) == expected
    assert server.queries() == before


def test_parent_entry_does_not_match_the_domain_itself(make_router):
    route = make_router(MAP).route("x@corp.test")
    assert route == Route("smtp", ("mx1.example.test",), 25, tls_policy="dane", mx=True)


def test_transport_map_smtp_route_uses_the_domains_tls_policy(make_router):
    router = make_router(merged(MAP, {"delivery": {"tls_policies": {"partner.test": "verify"}}}))
    assert router.route("x@partner.test").tls_policy == "verify"


def test_transport_map_wins_over_relayhost(make_router):
    router = make_router(merged(MAP, {"delivery": {"relayhost": "[127.0.0.5]:587"}}))
    assert router.route("x@void.test") == Route("discard")
    assert router.route("x@example.test").hosts == ("127.0.0.5",)


# -- 3. relayhost ------------------------------------------------------------------------------


def test_relayhost_with_auth_file_takes_all_other_mail_without_dns(make_router, server, tmp_path):
    auth = tmp_path / "relay-auth"
    auth.write_text("mailer:s3cr:et\nignored second line\n", encoding="utf-8")
    router = make_router({"delivery": {
        "relayhost": "[relay.example.test]:587",
        "relayhost_auth_file": str(auth),
        "relayhost_tls_policy": "encrypt",
        "tls_policy": "verify",
    }})
    before = server.queries()
    expected = Route("smtp", ("relay.example.test",), 587, tls_policy="encrypt", auth=("mailer", "s3cr:et"))
    assert router.route("bob@example.test") == expected
    assert router.route("bob@[192.0.2.1]") == expected
    assert router.route("bob@nosuch.test") == expected
    assert server.queries() == before


@pytest.mark.parametrize(("relayhost", "hosts", "port"), [
    ("relay.example.test", ("relay.example.test",), 25),
    ("127.0.0.1:2525", ("127.0.0.1",), 2525),
    ("[::1]:26", ("::1",), 26),
])
def test_relayhost_without_auth(make_router, relayhost, hosts, port):
    route = make_router({"delivery": {"relayhost": relayhost}}).route("bob@example.test")
    assert route == Route("smtp", hosts, port, tls_policy="may", auth=None)


@pytest.mark.parametrize(("content", "expected"), [
    ("user:password\n", ("user", "password")),
    ("user:pass:word\r\nmore\n", ("user", "pass:word")),
    ("user:", ("user", "")),
    ("user: spaced \n", ("user", " spaced ")),
])
def test_read_auth_file(tmp_path, content, expected):
    path = tmp_path / "auth"
    path.write_bytes(content.encode())
    assert read_auth_file(str(path)) == expected


@pytest.mark.parametrize(("content", "message"), [
    (None, "delivery.relayhost_auth_file: .*auth: No such file"),
    ("", "delivery.relayhost_auth_file: .*auth: expected one line user:password"),
    ("user password\n", "expected one line user:password"),
    (":password\n", "expected one line user:password"),
    ("\nuser:password\n", "expected one line user:password"),
])
def test_bad_relayhost_auth_file_is_a_config_error(make_router, tmp_path, content, message):
    path = tmp_path / "auth"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        make_router({"delivery": {"relayhost": "relay.example.test", "relayhost_auth_file": str(path)}})


# -- 4. MX hosts ----------------------------------------------------------------------------------


def test_mx_route_lists_hosts_in_preference_order(make_router):
    route = make_router().route("bob@Example.TEST.")
    assert route == Route("smtp", ("mx1.example.test", "mx2.example.test"), 25, tls_policy="dane", mx=True)


def test_mx_route_uses_mx_port_and_tls_policies(make_router):
    router = make_router({"delivery": {
        "mx_port": 2525, "tls_policy": "encrypt", "tls_policies": {"Secure.Test": "verify", "other.test": "none"}}})
    assert router.route("bob@example.test") == Route(
        "smtp", ("mx1.example.test", "mx2.example.test"), 2525, tls_policy="encrypt", mx=True)
    assert router.route("bob@secure.test") == Route("smtp", ("mx1.example.test",), 2525, tls_policy="verify",
                                                    mx=True)
    assert router.route("bob@other.test").tls_policy == "none"


@pytest.mark.parametrize(("address", "host"), [
    ("bob@[127.0.0.1]", "127.0.0.1"),
    ("bob@[IPv6:::1]", "::1"),
    ("bob@[ipv6:2001:DB8::1]", "2001:db8::1"),
])
def test_address_literal_is_connected_to_directly(make_router, server, address, host):
    router = make_router({"delivery": {"mx_port": 2525, "tls_policy": "encrypt"}})
    before = server.queries()
    assert router.route(address) == Route("smtp", (host,), 2525, tls_policy="encrypt")
    assert server.queries() == before


@pytest.mark.parametrize("address", ["bob@[not.an.address]", "bob@[999.1.1.1]"])
def test_malformed_address_literal_is_a_permanent_dns_error(make_router, address):
    with pytest.raises(DnsError) as info:
        make_router().route(address)
    assert info.value.enhanced == "5.1.3"


@pytest.mark.parametrize(("address", "enhanced"), [
    ("bob@nosuch.test", "5.1.2"),
    ("bob@nullmx.test", "5.1.10"),
])
def test_dns_error_propagates(make_router, address, enhanced):
    with pytest.raises(DnsError) as info:
        make_router().route(address)
    assert (info.value.enhanced, info.value.permanent) == (enhanced, True)


# -- Route.destination and describe --------------------------------------------------------------


def test_domains_with_the_same_mx_hosts_share_a_destination(make_router):
    router = make_router()
    example, same, other = (router.route(f"bob@{d}") for d in ("example.test", "same.test", "other.test"))
    assert example.hosts != same.hosts  # other preference order...
    assert example.destination == same.destination  # ...one provider
    assert example.destination != other.destination


@pytest.mark.parametrize(("a", "b", "equal"), [
    (Route("smtp", ("a", "b"), mx=True), Route("smtp", ("b", "a"), mx=True), True),
    (Route("smtp", ("a", "b")), Route("smtp", ("b", "a")), False),  # explicit hosts: order is meaningful
    (Route("smtp", ("a",), 25), Route("smtp", ("a",), 587), False),
    (Route("smtp", ("a",)), Route("lmtp", ("a",)), False),
    (Route("lmtp", path="/run/a", port=0), Route("lmtp", path="/run/b", port=0), False),
    (Route("smtp", ("a",), tls_policy="may"), Route("smtp", ("a",), tls_policy="verify"), True),
    (Route("hold"), Route("hold"), True),
    (Route("error", status="5.1.1"), Route("error", status="5.7.1"), True),
    (Route("hold"), Route("discard"), False),
])
def test_destination_key(a, b, equal):
    assert (a.destination == b.destination) is equal


@pytest.mark.parametrize(("route", "text"), [
    (Route("smtp", ("mx1.example.test", "mx2.example.test"), 25, mx=True), "smtp:mx1.example.test,mx2.example.test:25"),
    (Route("lmtp", ("127.0.0.1",), 24), "lmtp:127.0.0.1:24"),
    (Route("lmtp", path="/run/dovecot/lmtp", port=0), "lmtp:unix:/run/dovecot/lmtp"),
    (Route("maildir", path="/srv/%d/%u"), "maildir"),
    (Route("expand", targets=("a@b",)), "expand"),
])
def test_describe(route, text):
    assert route.describe() == text


# -- expansion ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aliases", [
    {"bob@local.test": "bob@local.test, archive@local.test"},
    {"a@local.test": "b@local.test", "b@local.test": "c@local.test, a@local.test"},
    {"list@local.test": "x@local.test, y@local.test", "x@local.test": "team@local.test",
     "y@local.test": "team@local.test", "team@local.test": "bob@local.test, c@local.test"},
], ids=["keeps-a-copy", "loop-with-exit", "reached-twice"])
def test_targets_of_an_expansion_are_final(make_router, aliases):
    router = make_router(merged(LOCAL, {"local": {
        "recipients": ["bob@local.test", "archive@local.test", "c@local.test"], "aliases": aliases}}))
    first = router.route(next(iter(aliases)))
    assert first.kind == "expand"
    for target in first.targets:
        # The scheduler routes the rows an expansion made with expand=False.
        assert router.route(target, expand=False).kind == "lmtp", target
    assert router.route("nobody@local.test", expand=False).kind == "error"


def test_only_an_mx_route_not_in_the_cache_needs_dns(make_router, server):
    router = make_router(merged(LOCAL, {"delivery": {"transport": {"corp.test": "smtp:[127.0.0.9]:2525"}}}))
    assert router.answers_now("bob@local.test") and router.answers_now("bob@corp.test")
    assert router.answers_now("bob@[192.0.2.1]")
    assert not router.answers_now("bob@other.test")
    router.route("bob@other.test")
    assert router.answers_now("bob@other.test")
    assert make_router({"delivery": {"relayhost": "[127.0.0.1]:2525"}}).answers_now("bob@fresh.test")
