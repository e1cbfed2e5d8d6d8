"""elemta.smtp.policy: the relay rules, and every known open-relay trick as a row of a table.

Each trick is a whole RCPT command line, parsed exactly as the session parses it. It must
either fail to parse (the client gets a 5xx syntax reply), be refused by may_relay, or be
accepted only as a recipient whose delivery stays where its domain says: the local transport
for a local domain, the domain's own MX for a relay domain, never a next hop taken from the
local part. The same rows then go through the real sans-IO Session, so they keep guarding
whichever relay check the session calls.
"""

from __future__ import annotations

import itertools

import pytest

from elemta import config
from elemta.delivery.dns import Resolver
from elemta.delivery.router import Router
from elemta.local import LocalRecipients
from elemta.smtp import address as addr
from elemta.smtp import envelope as env
from elemta.smtp.policy import SUBMISSION_ROLES, Decision, may_relay, sender_allowed
from elemta.smtp.session import Client, Enqueue, Services, Session, Settings
from tests.dnsserver import DnsServer

LOCAL = frozenset({"local.example", "xn--bcher-kva.example"})  # as config.parse leaves them
RELAY = frozenset({"relay.example", ".sub.example"})
RECORDS = {
    "relay.example": [("MX", (10, "mx.relay.example"), 300)],
    "a.sub.example": [("MX", (10, "mx.sub.example"), 300)],
    "a.b.sub.example": [("MX", (10, "mx.sub.example"), 300)],
    # Where a relay would go: any lookup of these names is a failure of the test.
    "evil.example": [("MX", (10, "mx.evil.example"), 300)],
    "other.example": [("MX", (10, "mx.evil.example"), 300)],
}


def parse_rcpt(line: str, smtputf8: bool = False) -> addr.Address:
    """What Session._rcpt does with a command line before any policy: AddressError or an Address."""
    verb, _, arg = line.partition(" ")
    assert verb.upper() == "RCPT"
    path, rest = addr.split_command_arg(arg.strip(" "), "TO")
    params = addr.parse_params(rest, env.RCPT_PARAMS)
    rcpt = addr.parse_path(path, smtputf8=smtputf8, allow_null=False, allow_postmaster=True)
    env.recipient(rcpt, params)
    return rcpt


def decide(rcpt: addr.Address, **overrides) -> Decision:
    kwargs = {
        "role": "mx", "authenticated": False, "trusted": False, "accept_all": False,
        "auth_required": True, "local_domains": LOCAL, "relay_domains": RELAY,
    }
    kwargs.update(overrides)
    return may_relay(rcpt, **kwargs)


def rcpt(text: str) -> addr.Address:
    return parse_rcpt(f"RCPT TO:<{text}>", smtputf8=True)


# ---- the rules ------------------------------------------------------------------------------

RULES = [
    # (recipient, overrides, allowed, reason)
    ("user@local.example", {}, True, "local_domain"),
    ("user@relay.example", {}, True, "relay_domain"),
    ("user@a.sub.example", {}, True, "relay_domain"),
    ("user@x.y.a.sub.example", {}, True, "relay_domain"),
    ("user@sub.example", {}, False, "not_local"),  # ".sub.example" is its subdomains only
    ("user@badsub.example", {}, False, "not_local"),  # not endswith("sub.example")
    ("user@xsub.example", {"relay_domains": frozenset({".sub.example", "sub.example"})}, False, "not_local"),
    ("user@sub.example", {"relay_domains": frozenset({".sub.example", "sub.example"})}, True, "relay_domain"),
    ("user@example", {"relay_domains": frozenset({".example"})}, False, "not_local"),
    ("user@evil.example", {}, False, "not_local"),
    ("user@evil.example", {"trusted": True}, True, "trusted_network"),
    ("user@evil.example", {"authenticated": True}, True, "authenticated"),
    ("user@evil.example", {"accept_all": True}, True, "dev"),
    ("user@evil.example", {"accept_all": True, "role": "submission"}, True, "dev"),
    ("user@[192.0.2.1]", {}, False, "address_literal"),
    ("user@[192.0.2.1]", {"local_domains": LOCAL | {"[192.0.2.1]"}}, False, "address_literal"),
    ("user@[192.0.2.1]", {"relay_domains": RELAY | {"[192.0.2.1]"}}, False, "address_literal"),
    ("user@[192.0.2.1]", {"authenticated": True}, True, "authenticated"),
    ("user@[192.0.2.1]", {"trusted": True}, True, "trusted_network"),
    ("postmaster", {}, True, "postmaster"),
    ("postmaster", {"role": "submission"}, True, "postmaster"),
    ("postmaster", {"role": "submissions"}, True, "postmaster"),
    ("postmaster@local.example", {}, True, "local_domain"),
    ("postmaster@evil.example", {}, False, "not_local"),
    # submission ports: users' clients, who must authenticate
    ("user@local.example", {"role": "submission"}, False, "auth_required"),
    ("user@local.example", {"role": "submissions"}, False, "auth_required"),
    ("user@evil.example", {"role": "submission"}, False, "auth_required"),
    ("user@evil.example", {"role": "submission", "authenticated": True}, True, "authenticated"),
    ("user@evil.example", {"role": "submissions", "authenticated": True}, True, "authenticated"),
    ("user@evil.example", {"role": "submission", "trusted": True}, True, "trusted_network"),
    ("user@evil.example", {"role": "submission", "auth_required": False}, True, "auth_not_required"),
    ("user@evil.example", {"role": "submissions", "auth_required": False}, True, "auth_not_required"),
    # auth_required is about the submission ports; port 25 keeps its rules
    ("user@evil.example", {"auth_required": False}, False, "not_local"),
    ("user@local.example", {"auth_required": False}, True, "local_domain"),
    ("user@local.example", {"local_domains": frozenset()}, False, "not_local"),
    ("user@local.example", {"local_domains": frozenset({".local.example"})}, False, "not_local"),
    ("user@mail.local.example", {}, False, "not_local"),  # local domains are exact
]


@pytest.mark.parametrize(("text", "overrides", "allowed", "reason"), RULES,
                         ids=[f"{r[0]} {r[1]}" for r in RULES])
def test_rules(text, overrides, allowed, reason):
    assert decide(rcpt(text), **overrides) == Decision(allowed, reason)


def test_submission_roles():
    assert frozenset({"submission", "submissions"}) == SUBMISSION_ROLES


def test_domain_case_and_trailing_dot_do_not_matter():
    # parse_path already lower-cases and refuses a root dot; may_relay does not rely on it.
    for domain in ("LOCAL.EXAMPLE", "local.example.", "Local.Example."):
        assert decide(addr.Address("user", domain, domain)).reason == "local_domain"
    assert decide(addr.Address("user", "A.Sub.Example.", "a.sub.example")).reason == "relay_domain"
    assert decide(addr.Address("user", "[192.0.2.1]", "[192.0.2.1]")).reason == "address_literal"


def test_no_domain_other_than_postmaster_is_refused():
    # parse_path gives no such Address; the function still lets only postmaster through.
    assert decide(addr.Address("root", "", "")) == Decision(False, "not_local")


def test_an_empty_relay_entry_covers_nothing():
    # config.parse turns a relay_domains entry "." into "": it must not match every domain.
    assert decide(rcpt("user@evil.example"), relay_domains=frozenset({"", "."})).allowed is False


# ---- the open-relay tricks ------------------------------------------------------------------

SYNTAX, LOCAL_MAIL, RELAYED, POSTMASTER = "syntax", "local", "relay", "postmaster"

# name -> (RCPT command line, SMTPUTF8 in MAIL, outcome: SYNTAX, LOCAL_MAIL, RELAYED,
# POSTMASTER or the reason of a refusal)
TRICKS = {
    # user@local@remote and friends: one mailbox, one '@' outside quotes
    "user@local@remote": ("RCPT TO:<user@local.example@evil.example>", False, SYNTAX),
    "user@remote@local": ("RCPT TO:<user@evil.example@local.example>", False, SYNTAX),
    "at escaped outside quotes": (r"RCPT TO:<user\@evil.example@local.example>", False, SYNTAX),
    # bare UUCP and percent paths: no domain at all
    "bang path alone": ("RCPT TO:<evil.example!user>", False, SYNTAX),
    "percent hack alone": ("RCPT TO:<user%evil.example>", False, SYNTAX),
    "source route to a bang path": ("RCPT TO:<@local.example:evil.example!user>", False, SYNTAX),
    "source route to a percent hack": ("RCPT TO:<@local.example:user%evil.example>", False, SYNTAX),
    "source route to nothing": ("RCPT TO:<@local.example:>", False, SYNTAX),
    "source route without its colon": ("RCPT TO:<@local.example,user@evil.example>", False, SYNTAX),
    "source route through a literal": ("RCPT TO:<@[192.0.2.1]:user@local.example>", False, SYNTAX),
    # percent and bang in the local part of a remote address
    "percent hack pointing home": ("RCPT TO:<user%local.example@evil.example>", False, "not_local"),
    "bang path pointing home": ("RCPT TO:<local.example!user@evil.example>", False, "not_local"),
    # percent and bang at a local domain: local mail, the local part is never routed on
    "percent hack": ("RCPT TO:<user%evil.example@local.example>", False, LOCAL_MAIL),
    "percent hack, two hops": ("RCPT TO:<user%evil.example%other.example@local.example>", False, LOCAL_MAIL),
    "bang path": ("RCPT TO:<evil.example!user@local.example>", False, LOCAL_MAIL),
    "bang path, other order": ("RCPT TO:<user!evil.example@local.example>", False, LOCAL_MAIL),
    # source routes: accepted, ignored (RFC 5321 §4.1.1.3); the final mailbox decides
    "source route via local to remote": ("RCPT TO:<@local.example:user@evil.example>", False, "not_local"),
    "source route, two local hops": ("RCPT TO:<@local.example,@relay.example:user@evil.example>", False, "not_local"),
    "source route via remote to local": ("RCPT TO:<@evil.example:user@local.example>", False, LOCAL_MAIL),
    "source route, two remote hops": ("RCPT TO:<@evil.example,@other.example:user@local.example>", False, LOCAL_MAIL),
    "source route to a relay domain": ("RCPT TO:<@evil.example:user@relay.example>", False, RELAYED),
    # quoted local parts
    "quoted remote address at local": ('RCPT TO:<"user@evil.example"@local.example>', False, LOCAL_MAIL),
    "quoted, escaped at": (r'RCPT TO:<"user\@evil.example"@local.example>', False, LOCAL_MAIL),
    "quoted percent hack": ('RCPT TO:<"user%evil.example"@local.example>', False, LOCAL_MAIL),
    "quoted source route": ('RCPT TO:<"@evil.example:user"@local.example>', False, LOCAL_MAIL),
    "quoted closing bracket": ('RCPT TO:<"user@evil.example>"@local.example>', False, LOCAL_MAIL),
    "quoted address literal": ('RCPT TO:<"user@[192.0.2.1]"@local.example>', False, LOCAL_MAIL),
    "quoted local address at remote": ('RCPT TO:<"user@local.example"@evil.example>', False, "not_local"),
    "quoted whole address": ('RCPT TO:<"user@evil.example">', False, SYNTAX),
    "quoted local address, no domain": ('RCPT TO:<"user@local.example">', False, SYNTAX),
    "quoted relay at a relay domain": ('RCPT TO:<"user@evil.example"@relay.example>', False, RELAYED),
    "percent hack at a relay domain": ("RCPT TO:<user%evil.example@relay.example>", False, RELAYED),
    # trailing dots and other domain spellings
    "trailing dot, local": ("RCPT TO:<user@local.example.>", False, SYNTAX),
    "trailing dot, remote": ("RCPT TO:<user@evil.example.>", False, SYNTAX),
    "two trailing dots": ("RCPT TO:<user@local.example..>", False, SYNTAX),
    "leading dot": ("RCPT TO:<user@.local.example>", False, SYNTAX),
    "empty label": ("RCPT TO:<user@local..example>", False, SYNTAX),
    "comma list of domains": ("RCPT TO:<user@local.example,evil.example>", False, SYNTAX),
    "percent in the domain": ("RCPT TO:<user@local.example%evil.example>", False, SYNTAX),
    "semicolon in the domain": ("RCPT TO:<user@evil.example;local.example>", False, SYNTAX),
    "slash in the domain": ("RCPT TO:<user@local.example/evil.example>", False, SYNTAX),
    "port in the domain": ("RCPT TO:<user@evil.example:25>", False, SYNTAX),
    "local domain as a prefix": ("RCPT TO:<user@local.example.evil.example>", False, "not_local"),
    "local domain as a suffix, no dot": ("RCPT TO:<user@evillocal.example>", False, "not_local"),
    "subdomain of a local domain": ("RCPT TO:<user@mail.local.example>", False, "not_local"),
    "relay domain as a prefix": ("RCPT TO:<user@relay.example.evil.example>", False, "not_local"),
    "apex of a dotted relay entry": ("RCPT TO:<user@sub.example>", False, "not_local"),
    "dotted relay entry, no dot": ("RCPT TO:<user@badsub.example>", False, "not_local"),
    "relay subdomain": ("RCPT TO:<user@a.sub.example>", False, RELAYED),
    "relay subdomain, mixed case": ("RCPT TO:<user@A.B.Sub.Example>", False, RELAYED),
    "relay domain": ("RCPT TO:<user@relay.example>", False, RELAYED),
    # case
    "local, upper case": ("RCPT TO:<USER@LOCAL.EXAMPLE>", False, LOCAL_MAIL),
    "remote, upper case": ("RCPT TO:<USER@EVIL.EXAMPLE>", False, "not_local"),
    "postmaster at local, mixed case": ("RCPT TO:<PostMaster@Local.Example>", False, LOCAL_MAIL),
    "postmaster at remote": ("RCPT TO:<postmaster@evil.example>", False, "not_local"),
    # IDNA: domains compare in the A-label form that routing uses
    "U-label of a local domain": ("RCPT TO:<user@bücher.example>", True, LOCAL_MAIL),
    "U-label of a local domain, upper case": ("RCPT TO:<user@BÜCHER.example>", True, LOCAL_MAIL),
    "A-label of a local domain, upper case": ("RCPT TO:<user@XN--BCHER-KVA.example>", False, LOCAL_MAIL),
    "U-label without SMTPUTF8": ("RCPT TO:<user@bücher.example>", False, SYNTAX),
    "fullwidth letters of a local domain": ("RCPT TO:<user@ｌｏｃａｌ.example>", True, LOCAL_MAIL),
    "zero-width space in a local domain": ("RCPT TO:<user@local.example\u200b>", True, LOCAL_MAIL),
    "fullwidth letters of a remote domain": ("RCPT TO:<user@ｅｖｉｌ.example>", True, "not_local"),
    "zero-width space in a remote domain": ("RCPT TO:<user@evil.example\u200b>", True, "not_local"),
    "ideographic full stop": ("RCPT TO:<user@local\u3002example>", True, SYNTAX),
    "ideographic full stop, remote": ("RCPT TO:<user@evil\u3002example>", True, SYNTAX),
    "bad A-label": ("RCPT TO:<user@xn--->", False, SYNTAX),
    "Punycode that is not IDNA": ("RCPT TO:<user@xn--a.example>", False, SYNTAX),
    # address literals
    "ipv4 literal": ("RCPT TO:<user@[192.0.2.1]>", False, "address_literal"),
    "loopback literal": ("RCPT TO:<user@[127.0.0.1]>", False, "address_literal"),
    "ipv6 literal": ("RCPT TO:<user@[IPv6:2001:db8::1]>", False, "address_literal"),
    "ipv4-mapped ipv6 literal": ("RCPT TO:<user@[IPv6:::ffff:127.0.0.1]>", False, "address_literal"),
    "general address literal": ("RCPT TO:<user@[x-foo:bar]>", False, "address_literal"),
    "local user at a literal": ('RCPT TO:<"user@local.example"@[192.0.2.1]>', False, "address_literal"),
    "literal with leading zeros": ("RCPT TO:<user@[192.0.2.01]>", False, SYNTAX),
    "unclosed literal": ("RCPT TO:<user@[192.0.2.1>", False, SYNTAX),
    # spaces and brackets
    "one space after the colon": ("RCPT TO: <user@evil.example>", False, "not_local"),
    "two spaces after the colon": ("RCPT TO:  <user@evil.example>", False, SYNTAX),
    "two spaces after RCPT": ("RCPT  TO:<user@evil.example>", False, "not_local"),
    "space inside, before": ("RCPT TO:< user@evil.example>", False, SYNTAX),
    "space inside, after": ("RCPT TO:<user@evil.example >", False, SYNTAX),
    "tab inside": ("RCPT TO:<user@evil.example\t>", False, SYNTAX),
    "no brackets": ("RCPT TO:user@evil.example", False, SYNTAX),
    "double brackets": ("RCPT TO:<<user@evil.example>>", False, SYNTAX),
    "second path as a parameter": ("RCPT TO:<user@local.example> <user@evil.example>", False, SYNTAX),
    "second path after a comma": ("RCPT TO:<user@local.example>,<user@evil.example>", False, SYNTAX),
    "NUL in the local part": ("RCPT TO:<user\x00@local.example>", False, SYNTAX),
    # DSN parameters only describe, they never route
    "remote ORCPT at local": ("RCPT TO:<user@local.example> NOTIFY=SUCCESS ORCPT=rfc822;user@evil.example",
                              False, LOCAL_MAIL),
    "local ORCPT at remote": ("RCPT TO:<user@evil.example> ORCPT=rfc822;user@local.example", False, "not_local"),
    # the bare postmaster
    "bare postmaster": ("RCPT TO:<postmaster>", False, POSTMASTER),
    "bare postmaster, mixed case": ("RCPT TO:<PostMaster>", False, POSTMASTER),
    "bare postmaster, quoted": ('RCPT TO:<"postmaster">', False, SYNTAX),
    "postmaster, empty domain": ("RCPT TO:<postmaster@>", False, SYNTAX),
    "postmaster behind a source route": ("RCPT TO:<@evil.example:postmaster>", False, SYNTAX),
    "null path": ("RCPT TO:<>", False, SYNTAX),
}


@pytest.mark.parametrize("name", list(TRICKS))
def test_trick_is_refused_or_stays_where_its_domain_says(name):
    line, smtputf8, outcome = TRICKS[name]
    if outcome == SYNTAX:
        with pytest.raises(addr.AddressError):
            parse_rcpt(line, smtputf8)
        return
    decision = decide(parse_rcpt(line, smtputf8))
    expected = {LOCAL_MAIL: "local_domain", RELAYED: "relay_domain", POSTMASTER: "postmaster"}.get(outcome, outcome)
    assert decision == Decision(outcome in (LOCAL_MAIL, RELAYED, POSTMASTER), expected)


@pytest.fixture(scope="module")
def dns():
    with DnsServer(RECORDS) as server:
        yield server


@pytest.fixture(scope="module")
def router(dns):
    cfg = config.parse({"smtp": {"local_domains": sorted(LOCAL), "relay_domains": sorted(RELAY)}})
    return Router(cfg, Resolver([dns.nameserver], timeout=5.0))


ACCEPTED = [name for name in TRICKS if TRICKS[name][2] in (LOCAL_MAIL, RELAYED, POSTMASTER)]


def queued_address(line: str, smtputf8: bool) -> str:
    """The recipient address the real session puts in the queue for this RCPT line."""
    session = session_for()
    assert rcpt_reply(session, line, smtputf8) == "250 2.1.5"
    assert reply(session.feed(b"DATA\r\n")) == "354"
    [enqueue] = session.feed(b"Subject: t\r\n\r\nhi\r\n.\r\n")
    [recipient] = enqueue.message.recipients
    return recipient.address


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_trick_is_routed_by_its_domain_alone(name, router, dns):
    line, smtputf8, outcome = TRICKS[name]
    queued = queued_address(line, smtputf8)
    route = router.route(queued)
    if outcome == RELAYED:
        # The next hop comes from the recipient's domain, as for any plain address there.
        assert route == router.route(f"someone@{parse_rcpt(line, smtputf8).domain}")
        assert route.kind == "smtp"
        assert route.mx and route.hosts in (("mx.relay.example",), ("mx.sub.example",))
    else:
        assert router.recipients.is_local(queued)
        assert LocalRecipients(LOCAL).is_local(queued)  # the table the session asks at RCPT
        assert route == router.route("someone@local.example")  # the local transport
    assert dns.queries("evil.example") == 0
    assert dns.queries("other.example") == 0
    assert dns.queries("mx.evil.example") == 0


@pytest.mark.parametrize("configured", ["xn--bcher-kva.example", "bücher.example", "BÜCHER.example."])
@pytest.mark.parametrize("written", ["bücher.example", "xn--bcher-kva.example"])
def test_policy_and_delivery_agree_on_what_is_local(configured, written, dns):
    # Whatever form the admin wrote the domain in, RCPT must not accept as local what
    # delivery would then route elsewhere (or the other way round).
    cfg = config.parse({"smtp": {"local_domains": [configured]}})
    router = Router(cfg, Resolver([dns.nameserver], timeout=5.0))
    recipient = rcpt(f"user@{written}")
    accepted = decide(recipient, local_domains=frozenset(cfg.smtp.local_domains), relay_domains=frozenset())
    assert accepted.allowed == router.recipients.is_local(str(recipient))


# ---- the same tricks through the real session -----------------------------------------------

SYNTAX_REPLIES = {"501 5.1.3", "501 5.5.4", "553 5.6.7", "555 5.5.4"}


def session_for(role="mx", trusted=False, **overrides) -> Session:
    settings = {
        "hostname": "mx.local.example", "role": role, "max_recipients": 1000, "max_errors": 1000,
        "local_domains": LOCAL, "relay_domains": RELAY,
    }
    settings.update(overrides)
    counter = itertools.count(1)
    services = Services(new_id=lambda: f"Q{next(counter):04d}", now=lambda: 1_700_000_000.0)
    return Session(Settings(**settings), Client("203.0.113.9", 4321, trusted), services)


def reply(outputs) -> str:
    assert len(outputs) == 1 and not isinstance(outputs[0], Enqueue), outputs
    return f"{outputs[0].code} {outputs[0].enhanced}".strip()


def rcpt_reply(session: Session, line: str, smtputf8: bool) -> str:
    assert reply(session.feed(b"EHLO client.example\r\n")).startswith("250")
    mail = b"MAIL FROM:<a@sender.example>" + (b" SMTPUTF8" if smtputf8 else b"") + b"\r\n"
    reply(session.feed(mail))  # 250, or 530 on a locked submission port
    return reply(session.feed(line.encode("utf-8") + b"\r\n"))


@pytest.mark.parametrize("name", list(TRICKS))
def test_trick_through_the_session(name):
    line, smtputf8, outcome = TRICKS[name]
    got = rcpt_reply(session_for(), line, smtputf8)
    if outcome == SYNTAX:
        assert got in SYNTAX_REPLIES
    elif outcome in (LOCAL_MAIL, RELAYED, POSTMASTER):
        assert got == "250 2.1.5"
    else:
        assert got == "550 5.7.1"


@pytest.mark.parametrize("name", [n for n in TRICKS if TRICKS[n][2] == LOCAL_MAIL])
def test_tricks_at_a_local_domain_meet_the_recipients_table(name):
    # With recipients listed, a local part that is not listed is unknown (550 5.1.1): the
    # percent, bang and quoted forms are not another spelling of a listed user.
    line, smtputf8, _ = TRICKS[name]
    table = LocalRecipients(LOCAL, ["user@local.example", "someone@xn--bcher-kva.example"])
    got = rcpt_reply(session_for(recipients=table), line, smtputf8)
    plain = parse_rcpt(line, smtputf8)
    assert got == ("250 2.1.5" if table.accepts(str(plain)) else "550 5.1.1")
    if "%" in plain.local or "!" in plain.local or "@" in plain.local:
        assert got == "550 5.1.1"


@pytest.mark.parametrize(("role", "trusted", "accept_all", "auth_required"),
                         list(itertools.product(["mx", "submission"], [False, True], [False, True], [False, True])))
@pytest.mark.parametrize("text", ["user@local.example", "user@relay.example", "user@a.sub.example",
                                  "user@sub.example", "user@evil.example", "user@[192.0.2.1]", "postmaster"])
def test_session_relay_control_matches_may_relay(role, trusted, accept_all, auth_required, text):
    # Today's session and may_relay agree everywhere (no AUTH yet, so never authenticated).
    session = session_for(role=role, trusted=trusted, accept_all=accept_all, auth_required=auth_required)
    got = rcpt_reply(session, f"RCPT TO:<{text}>", False)
    decision = decide(rcpt(text), role=role, trusted=trusted, accept_all=accept_all, auth_required=auth_required)
    if role in SUBMISSION_ROLES and auth_required and not (trusted or accept_all):
        # MAIL got 530 5.7.0 already, so no RCPT gets as far as relay control.
        assert got == "503 5.5.1"
        assert decision.allowed == (text == "postmaster")
    else:
        assert got == ("250 2.1.5" if decision.allowed else "550 5.7.1")


@pytest.mark.parametrize("user, sender, allowed", [
    ("alice@example.org", "alice@example.org", True),
    ("Alice@Example.org", "alice@EXAMPLE.org", True),
    ("alice@example.org", "bob@example.org", False),
    ("alice", "alice@example.org", False),  # a login that is no address owns nothing by default
    ("bob", "bob@example.org", True),
    ("bob", "x@sub.example.net", False),  # "@example.net" is that domain only
    ("bob", "x@example.net", True),
    ("carol", "anyone@anywhere.example", True),
])
def test_sender_allowed(user, sender, allowed):
    logins = {"bob": "bob@example.org, @example.net", "carol": "*"}
    assert sender_allowed(user, sender, logins) is allowed
