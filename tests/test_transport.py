"""elemta.transport: the transport syntax of local.transport, delivery.transport and relayhost."""

import re

import pytest

from elemta import config
from elemta.errors import ConfigError
from elemta.transport import Transport, parse, split_next_hop

# -- every documented syntax --------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    # smtp:host:port and smtp:[host]:port, port 25 when omitted
    ("smtp:mail.example.org:2525", Transport("smtp", host="mail.example.org", port=2525)),
    ("smtp:mail.example.org", Transport("smtp", host="mail.example.org", port=25)),
    ("smtp:[mail.example.org]:587", Transport("smtp", host="mail.example.org", port=587)),
    ("smtp:[mail.example.org]", Transport("smtp", host="mail.example.org", port=25)),
    ("smtp:192.0.2.1:25", Transport("smtp", host="192.0.2.1", port=25)),
    ("smtp:[192.0.2.1]", Transport("smtp", host="192.0.2.1", port=25)),
    ("smtp:[2001:db8::1]:2525", Transport("smtp", host="2001:db8::1", port=2525)),
    ("smtp:[2001:db8::1]", Transport("smtp", host="2001:db8::1", port=25)),
    ("smtp:mx_1.example.org.:1", Transport("smtp", host="mx_1.example.org.", port=1)),
    ("smtp:relay:65535", Transport("smtp", host="relay", port=65535)),
    # lmtp:host:port (24 when omitted) and lmtp:unix:/path
    ("lmtp:127.0.0.1:24", Transport("lmtp", host="127.0.0.1", port=24)),
    ("lmtp:mailstore.example.org", Transport("lmtp", host="mailstore.example.org", port=24)),
    ("lmtp:[::1]:2424", Transport("lmtp", host="::1", port=2424)),
    ("lmtp:unix:/run/dovecot/lmtp", Transport("lmtp", path="/run/dovecot/lmtp")),
    # maildir:/path with %d and %u
    ("maildir:/var/mail/%d/%u", Transport("maildir", path="/var/mail/%d/%u")),
    ("maildir:/", Transport("maildir", path="/")),
    # hold, discard
    ("hold", Transport("hold")),
    ("discard", Transport("discard")),
    # error:CODE TEXT
    ("error:5.1.1 no such user", Transport("error", status="5.1.1", text="no such user")),
    ("error:4.7.1 try again later", Transport("error", status="4.7.1", text="try again later")),
    ("error:5.7.1", Transport("error", status="5.7.1")),
    ("error:5.123.456 x", Transport("error", status="5.123.456", text="x")),
    ("error:5.1.1    spaced   text   ", Transport("error", status="5.1.1", text="spaced   text")),
    # the kind is case-insensitive, surrounding blanks are ignored, the host keeps its case
    ("  SMTP:Mail.Example.ORG:25 ", Transport("smtp", host="Mail.Example.ORG", port=25)),
    ("LMTP:unix:/run/lmtp", Transport("lmtp", path="/run/lmtp")),
    ("Maildir:/srv/mail/%d/%u", Transport("maildir", path="/srv/mail/%d/%u")),
    ("HOLD", Transport("hold")),
    ("Discard", Transport("discard")),
    ("ERROR:5.1.1 gone", Transport("error", status="5.1.1", text="gone")),
])
def test_parse_accepts_every_documented_syntax(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(("text", "default_port", "expected"), [
    ("smtp:relay.example.org", 587, Transport("smtp", host="relay.example.org", port=587)),
    ("smtp:relay.example.org:26", 587, Transport("smtp", host="relay.example.org", port=26)),
    ("lmtp:store.example.org", 2424, Transport("lmtp", host="store.example.org", port=2424)),
    ("lmtp:store.example.org", 25, Transport("lmtp", host="store.example.org", port=24)),
])
def test_parse_uses_the_default_port_when_none_is_given(text, default_port, expected):
    assert parse(text, default_port=default_port) == expected


@pytest.mark.parametrize(("text", "canonical"), [
    ("smtp:mail.example.org", "smtp:mail.example.org:25"),
    ("smtp:mail.example.org:2525", "smtp:mail.example.org:2525"),
    ("smtp:[mail.example.org]:587", "smtp:mail.example.org:587"),
    ("smtp:[192.0.2.1]", "smtp:192.0.2.1:25"),
    ("smtp:[2001:db8::1]", "smtp:[2001:db8::1]:25"),
    ("SMTP:Mail.Example.ORG", "smtp:Mail.Example.ORG:25"),
    ("lmtp:127.0.0.1:24", "lmtp:127.0.0.1:24"),
    ("lmtp:mailstore", "lmtp:mailstore:24"),
    ("lmtp:[::1]:2424", "lmtp:[::1]:2424"),
    ("lmtp:unix:/run/dovecot/lmtp", "lmtp:unix:/run/dovecot/lmtp"),
    ("maildir:/var/mail/%d/%u", "maildir:/var/mail/%d/%u"),
    ("hold", "hold"),
    ("DISCARD", "discard"),
    ("error:5.1.1 no such user", "error:5.1.1 no such user"),
    ("error:4.7.1", "error:4.7.1"),
    ("error:5.7.1   why  ", "error:5.7.1 why"),
])
def test_str_is_canonical_and_parses_back_to_the_same_transport(text, canonical):
    transport = parse(text)
    assert str(transport) == canonical
    assert parse(str(transport)) == transport


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    # missing ']'
    ("smtp:[2001:db8::1:25", "missing ']'"),
    ("smtp:[mail.example.org", "missing ']'"),
    # something other than :PORT after ']'
    ("smtp:[2001:db8::1]25", "expected [HOST]:PORT"),
    ("smtp:[::1] :25", "expected [HOST]:PORT"),
    # bad port
    ("smtp:mail.example.org:0", "port must be 1 to 65535"),
    ("smtp:mail.example.org:65536", "port must be 1 to 65535"),
    ("smtp:mail.example.org:-1", "port must be 1 to 65535"),
    ("smtp:mail.example.org:smtp", "port must be 1 to 65535"),
    ("smtp:mail.example.org:2 5", "port must be 1 to 65535"),
    ("smtp:mail.example.org:\u0662\u0665", "port must be 1 to 65535"),  # Arabic-Indic digits
    ("lmtp:[::1]:99999", "port must be 1 to 65535"),
    # IPv6 without brackets
    ("smtp:2001:db8::1", "write IPv6 addresses in brackets"),
    ("smtp:2001:db8::1:25", "write IPv6 addresses in brackets"),
    ("lmtp:::1", "write IPv6 addresses in brackets"),
    ("smtp:host:25:26", "write IPv6 addresses in brackets"),
    # no host, or not a host
    ("smtp:", "no host"),
    ("smtp::25", "no host"),
    ("smtp:[]:25", "no host"),
    ("smtp:-mail.example.org", "is not a host name or IP address"),
    ("smtp:mail.example.org-", "is not a host name or IP address"),
    ("smtp:mail example.org", "is not a host name or IP address"),
    ("smtp:mail/example:25", "is not a host name or IP address"),
    ("smtp:[not an address]:25", "is not a host name or IP address"),
    # unknown kind, or no kind at all
    ("relay:mail.example.org", "unknown transport 'relay'"),
    ("Virtual:mail.example.org", "unknown transport 'virtual'"),
    ("mail.example.org", "expected smtp:HOST[:PORT], lmtp:HOST:PORT, lmtp:unix:PATH, maildir:PATH"),
    ("", "expected smtp:HOST[:PORT]"),
    ("smtp", "expected smtp:HOST[:PORT]"),
    # relative paths
    ("maildir:var/mail/%d/%u", "maildir: needs an absolute path"),
    ("maildir:~/Maildir", "maildir: needs an absolute path"),
    ("maildir:", "maildir: needs an absolute path"),
    ("lmtp:unix:run/dovecot/lmtp", "lmtp:unix: needs an absolute socket path"),
    ("lmtp:unix:", "lmtp:unix: needs an absolute socket path"),
    # error status not like 5.1.1
    ("error:550 no such user", "error: '550' is not a status like 5.1.1 or 4.7.1"),
    ("error:2.0.0 ok", "error: '2.0.0' is not a status like 5.1.1"),
    ("error:5.1 short", "error: '5.1' is not a status like 5.1.1"),
    ("error:5.1.1234 long", "error: '5.1.1234' is not a status like 5.1.1"),
    ("error:5.x.1 letters", "error: '5.x.1' is not a status like 5.1.1"),
    ("error:5.1.1,x", "error: '5.1.1,x' is not a status like 5.1.1"),
    ("error:", "error: '' is not a status like 5.1.1"),
    ("error: 5.1.1 leading blank", "error: '' is not a status like 5.1.1"),
    # hold and discard take no argument
    ("hold:now", "hold takes no argument"),
    ("HOLD:x", "hold takes no argument"),
    ("discard:everything", "discard takes no argument"),
])
def test_parse_rejects_bad_input_with_a_message_that_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(text)


# -- split_next_hop -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "default_port", "expected"), [
    ("mail.example.org", 25, ("mail.example.org", 25)),
    ("mail.example.org", 587, ("mail.example.org", 587)),
    ("mail.example.org:587", 25, ("mail.example.org", 587)),
    ("[mail.example.org]:587", 25, ("mail.example.org", 587)),
    ("[mail.example.org]", 26, ("mail.example.org", 26)),
    ("192.0.2.1:1", 25, ("192.0.2.1", 1)),
    ("[192.0.2.1]", 25, ("192.0.2.1", 25)),
    ("[2001:db8::1]:25", 25, ("2001:db8::1", 25)),
    ("[2001:db8::1]", 2525, ("2001:db8::1", 2525)),
    ("relay:65535", 25, ("relay", 65535)),
])
def test_split_next_hop_returns_host_and_port(text, default_port, expected):
    assert split_next_hop(text, default_port) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("[2001:db8::1:25", "missing ']'"),
    ("[2001:db8::1]x", "expected [HOST]:PORT"),
    ("relay.example.org:0", "port must be 1 to 65535"),
    ("relay.example.org:65536", "port must be 1 to 65535"),
    ("relay.example.org:x", "port must be 1 to 65535"),
    ("2001:db8::1", "write IPv6 addresses in brackets, [2001:db8::1]:25"),
    ("::1", "write IPv6 addresses in brackets"),
    ("", "no host"),
    (":25", "no host"),
    ("[]", "no host"),
    ("relay example", "is not a host name or IP address"),
])
def test_split_next_hop_error_names_the_text_and_the_problem(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        split_next_hop(text)
    assert str(info.value).startswith(f"{text!r}: ")


# -- the same checks at configuration load -----------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    ({"local": {"transport": "maildir:Maildir"}}, "local.transport: 'maildir:Maildir': maildir: needs"),
    ({"delivery": {"transport": {"example.org": "hold:1"}}},
     "delivery.transport.example.org: 'hold:1': hold takes no argument"),
    ({"delivery": {"relayhost": "2001:db8::1"}}, "delivery.relayhost: '2001:db8::1': write IPv6"),
])
def test_config_load_reports_a_bad_transport_with_its_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.parse(data)


# -- edge cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["smtp:mail.example.org:", "smtp:[2001:db8::1]:", "lmtp:store:"])
def test_colon_without_a_port_is_a_bad_port(text):
    with pytest.raises(ValueError, match="port must be 1 to 65535"):
        parse(text)


@pytest.mark.parametrize("call", [
    lambda: split_next_hop("relay.example.org\n"),
    lambda: parse("smtp:mail.example.org\n:25"),
    lambda: parse("error:5.1.1\n no such user"),
], ids=["relayhost", "smtp-host", "error-status"])
def test_line_feed_in_host_or_status_is_rejected(call):
    with pytest.raises(ValueError, match="not a"):
        call()


def test_lmtp_unix_prefix_is_case_insensitive_like_the_kind():
    assert parse("lmtp:UNIX:/run/dovecot/lmtp") == Transport("lmtp", path="/run/dovecot/lmtp")
