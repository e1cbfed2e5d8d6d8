"""Tests for elemta.smtp.address: SMTP path and ESMTP parameter parsing."""

import pickle

import pytest

from elemta.errors import ElemtaError
from elemta.smtp.address import (
    Address,
    AddressError,
    parse_body,
    parse_envid,
    parse_mt_priority,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_path,
    parse_ret,
    parse_size,
    split_command_arg,
    xtext_decode,
)


def rcpt(path, smtputf8=False):
    return parse_path(path, smtputf8=smtputf8, allow_null=False, allow_postmaster=True)


def mail(path, smtputf8=False):
    return parse_path(path, smtputf8=smtputf8, allow_null=True, allow_postmaster=False)


def labels(total):
    """A dotted domain of exactly `total` octets, labels as even as possible and at most 63."""
    count = -(-(total + 1) // 64)  # each label needs at most 63 octets plus a dot
    octets = total - (count - 1)
    sizes = [octets // count + (i < octets % count) for i in range(count)]
    domain = ".".join("a" * size for size in sizes)
    assert len(domain) == total and max(sizes) <= 63
    return domain


# --- AddressError -----------------------------------------------------------


def test_address_error_carries_kind_and_text():
    e = AddressError("syntax", "Syntax error in local part")
    assert e.kind == "syntax"
    assert str(e) == "Syntax error in local part"
    assert isinstance(e, ValueError)
    assert isinstance(e, ElemtaError)


def test_address_error_survives_pickling():
    e = pickle.loads(pickle.dumps(AddressError("param", "Invalid SIZE value")))
    assert (e.kind, str(e)) == ("param", "Invalid SIZE value")


def test_address_error_refuses_unknown_kind():
    with pytest.raises(ValueError, match="unknown AddressError kind"):
        AddressError("bogus", "x")


# --- parse_path: accepted paths --------------------------------------------

VALID_PATHS = [
    # (path, smtputf8, (local, domain, utf8_domain), str)
    ("<user@example.com>", False, ("user", "example.com", "example.com"), "user@example.com"),
    ("<User.Name+tag@Example.COM>", False, ("User.Name+tag", "example.com", "example.com"), "User.Name+tag@example.com"),
    ("<!#$%&'*+-/=?^_`{|}~@x.org>", False, ("!#$%&'*+-/=?^_`{|}~", "x.org", "x.org"), "!#$%&'*+-/=?^_`{|}~@x.org"),
    ("<a@localhost>", False, ("a", "localhost", "localhost"), "a@localhost"),
    ("<a@a-b.c0>", False, ("a", "a-b.c0", "a-b.c0"), "a@a-b.c0"),
    # quoted local parts: value unquoted, str() re-quotes only when needed
    ('<"john doe"@example.com>', False, ("john doe", "example.com", "example.com"), '"john doe"@example.com'),
    ('<"a\\"b"@example.com>', False, ('a"b', "example.com", "example.com"), '"a\\"b"@example.com'),
    ('<"a\\\\b"@x.org>', False, ("a\\b", "x.org", "x.org"), '"a\\\\b"@x.org'),
    ('<"\\a\\b"@x.org>', False, ("ab", "x.org", "x.org"), "ab@x.org"),
    ('<"plain"@example.com>', False, ("plain", "example.com", "example.com"), "plain@example.com"),
    ('<"a..b"@x.org>', False, ("a..b", "x.org", "x.org"), '"a..b"@x.org'),
    ('<".a"@x.org>', False, (".a", "x.org", "x.org"), '".a"@x.org'),
    ('<"x>y"@z>', False, ("x>y", "z", "z"), '"x>y"@z'),
    ('<"a@b"@c.d>', False, ("a@b", "c.d", "c.d"), '"a@b"@c.d'),
    ('<""@x.org>', False, ("", "x.org", "x.org"), '""@x.org'),
    # source routes are accepted and dropped
    ("<@route.example:user@example.com>", False, ("user", "example.com", "example.com"), "user@example.com"),
    ("<@a.example,@b.example:u@c.example>", False, ("u", "c.example", "c.example"), "u@c.example"),
    # address literals
    ("<user@[192.0.2.1]>", False, ("user", "[192.0.2.1]", "[192.0.2.1]"), "user@[192.0.2.1]"),
    ("<user@[255.255.255.255]>", False, ("user", "[255.255.255.255]", "[255.255.255.255]"), "user@[255.255.255.255]"),
    ("<user@[IPv6:2001:DB8::1]>", False, ("user", "[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"), "user@[IPv6:2001:db8::1]"),
    ("<user@[ipv6:::1]>", False, ("user", "[IPv6:::1]", "[IPv6:::1]"), "user@[IPv6:::1]"),
    ("<u@[IPv6:::ffff:192.0.2.1]>", False, ("u", "[IPv6:::ffff:192.0.2.1]", "[IPv6:::ffff:192.0.2.1]"), "u@[IPv6:::ffff:192.0.2.1]"),
    ("<u@[x-tag:any=thing]>", False, ("u", "[x-tag:any=thing]", "[x-tag:any=thing]"), "u@[x-tag:any=thing]"),
    # A-labels given directly round-trip to U-labels
    ("<a@xn--bcher-kva.example>", False, ("a", "xn--bcher-kva.example", "bücher.example"), "a@xn--bcher-kva.example"),
    ("<a@XN--BCHER-KVA.Example>", False, ("a", "xn--bcher-kva.example", "bücher.example"), "a@xn--bcher-kva.example"),
    # SMTPUTF8: U-labels converted, UTF-8 local parts kept
    ("<a@bücher.example>", True, ("a", "xn--bcher-kva.example", "bücher.example"), "a@xn--bcher-kva.example"),
    ("<a@Bücher.Example>", True, ("a", "xn--bcher-kva.example", "bücher.example"), "a@xn--bcher-kva.example"),
    ("<josé@example.com>", True, ("josé", "example.com", "example.com"), "josé@example.com"),
    ("<用户@例子.广告>", True, ("用户", "xn--fsqu00a.xn--4rr70v", "例子.广告"), "用户@xn--fsqu00a.xn--4rr70v"),
    ('<"jo sé"@bücher.example>', True, ("jo sé", "xn--bcher-kva.example", "bücher.example"), '"jo sé"@xn--bcher-kva.example'),
    ("<user@example.com>", True, ("user", "example.com", "example.com"), "user@example.com"),
    # Postmaster with a domain is an ordinary mailbox; local-part case kept
    ("<Postmaster@Example.com>", False, ("Postmaster", "example.com", "example.com"), "Postmaster@example.com"),
    ("<a@" + "B" * 63 + ".example>", False, ("a", "b" * 63 + ".example", "b" * 63 + ".example"),
     "a@" + "b" * 63 + ".example"),
]


@pytest.mark.parametrize("path, smtputf8, fields, text", VALID_PATHS)
def test_parse_path_valid(path, smtputf8, fields, text):
    address = rcpt(path, smtputf8=smtputf8)
    assert (address.local, address.domain, address.utf8_domain) == fields
    assert str(address) == text
    assert address.is_null is False


NEEDS_SMTPUTF8 = [
    ("<a@example.com>", False),
    ("<a@bücher.example>", False),  # the domain can travel as A-labels
    ("<a@xn--bcher-kva.example>", False),
    ("<josé@example.com>", True),
    ('<"é"@bücher.example>', True),
]


@pytest.mark.parametrize("path, expected", NEEDS_SMTPUTF8)
def test_needs_smtputf8(path, expected):
    assert rcpt(path, smtputf8=True).needs_smtputf8 is expected


# --- null path and postmaster ----------------------------------------------


def test_null_path_allowed_for_mail():
    address = mail("<>")
    assert address == Address("", "", "")
    assert address.is_null is True
    assert address.needs_smtputf8 is False
    assert str(address) == ""


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_allowed_for_rcpt(path):
    address = rcpt(path)
    assert address == Address("postmaster", "", "")
    assert address.is_null is False
    assert str(address) == "postmaster"


# --- parse_path: refused paths ---------------------------------------------

INVALID_PATHS = [
    # (path, smtputf8, allow_null, allow_postmaster, kind)
    ("<a@" + "b" * 64 + ".example>", False, True, True, "domain"),  # a label of 64 octets (RFC 1035 §2.3.4)
    ("<a@b-.example>", False, True, True, "domain"),
    ("user@example.com", False, True, True, "syntax"),
    ("<user@example.com", False, True, True, "syntax"),
    ("user@example.com>", False, True, True, "syntax"),
    ("<", False, True, True, "syntax"),
    ("", False, True, True, "syntax"),
    ("<>", False, False, True, "syntax"),
    ("<postmaster>", False, True, False, "syntax"),
    ('<"postmaster">', False, True, True, "syntax"),
    ("<@a.example:postmaster>", False, True, True, "syntax"),
    ("<pepe>", False, True, True, "syntax"),
    ("<@a.example:>", False, True, True, "syntax"),
    # dot-string errors
    ("<.a@b.c>", False, True, True, "syntax"),
    ("<a.@b.c>", False, True, True, "syntax"),
    ("<a..b@c.d>", False, True, True, "syntax"),
    ("<@b.c>", False, True, True, "syntax"),
    ("<a b@c.d>", False, True, True, "syntax"),
    ("<a\\b@c.d>", False, True, True, "syntax"),
    ("<a(x)@c.d>", False, True, True, "syntax"),
    ("<<a@c.d>>", False, True, True, "syntax"),
    # quoted-string errors
    ('<"unterminated@c.d>', False, True, True, "syntax"),
    ('<"a"b@c.d>', False, True, True, "syntax"),
    ('<"a\tb"@c.d>', False, True, True, "syntax"),
    ('<"a\\\x01"@c.d>', False, True, True, "syntax"),
    ('<"a\\é"@c.d>', True, True, True, "syntax"),
    # source-route errors
    ("<@a.example user@b.c>", False, True, True, "syntax"),
    ("<@a.example,b.example:u@c.d>", False, True, True, "syntax"),
    ("<@[192.0.2.1]:u@c.d>", False, True, True, "syntax"),
    ("<@:u@c.d>", False, True, True, "domain"),
    ("<@-a.example:u@c.d>", False, True, True, "domain"),
    # domain errors
    ("<a@>", False, True, True, "domain"),
    ("<a@example.com.>", False, True, True, "domain"),
    ("<a@.example.com>", False, True, True, "domain"),
    ("<a@exa..mple>", False, True, True, "domain"),
    ("<a@-example.com>", False, True, True, "domain"),
    ("<a@example-.com>", False, True, True, "domain"),
    ("<a@ex_ample.com>", False, True, True, "domain"),
    ("<a@b@c.d>", False, True, True, "domain"),
    ("<a@b c.d>", False, True, True, "domain"),
    ("<a@" + "a" * 64 + ".com>", False, True, True, "domain"),
    ("<a@xn--->", False, True, True, "domain"),
    ("<a@xn-->", False, True, True, "domain"),
    ("<a@xn--zz.example>", False, True, True, "domain"),
    ("<a@xn--a.example>", False, True, True, "domain"),
    ("<a@a。b>", True, True, True, "domain"),
    ("<a@☃.example>", True, True, True, "domain"),
    ("<a@" + "ü" * 60 + ".example>", True, True, True, "domain"),
    # address literals
    ("<a@[300.1.1.1]>", False, True, True, "domain"),
    ("<a@[1.2.3]>", False, True, True, "domain"),
    ("<a@[1.2.3.4.5]>", False, True, True, "domain"),
    ("<a@[١.2.3.4]>", True, True, True, "domain"),
    ("<a@[1.2.3.4 ]>", False, True, True, "domain"),
    ("<a@[01.2.3.4]>", False, True, True, "domain"),
    ("<a@[1.2.3.4>", False, True, True, "domain"),
    ("<a@[]>", False, True, True, "domain"),
    ("<a@[IPv6:zz]>", False, True, True, "domain"),
    ("<a@[IPv6:1.2.3.4]>", False, True, True, "domain"),
    ("<a@[IPv6:fe80::1%eth0]>", False, True, True, "domain"),
    ("<a@[tag:]>", False, True, True, "domain"),
    ("<a@[-:x]>", False, True, True, "domain"),
    ("<a@[tag:a[b]>", False, True, True, "domain"),
    ("<a@[tag:a b]>", False, True, True, "domain"),
    # non-ASCII without SMTPUTF8
    ("<josé@example.com>", False, True, True, "utf8"),
    ("<a@bücher.example>", False, True, True, "utf8"),
    ('<"é"@x.org>', False, True, True, "utf8"),
    ("<@bücher.example:a@b.c>", False, True, True, "utf8"),
    # undecodable bytes smuggled in as surrogates are not UTF-8
    ("<a\udce9@x.org>", True, True, True, "syntax"),
]


@pytest.mark.parametrize("path, smtputf8, allow_null, allow_postmaster, kind", INVALID_PATHS)
def test_parse_path_invalid(path, smtputf8, allow_null, allow_postmaster, kind):
    with pytest.raises(AddressError) as info:
        parse_path(path, smtputf8=smtputf8, allow_null=allow_null, allow_postmaster=allow_postmaster)
    assert info.value.kind == kind


def test_error_text_does_not_echo_client_input():
    with pytest.raises(AddressError) as info:
        rcpt("<a\r\nRCPT@x..y>")
    assert "\r" not in str(info.value) and "RCPT" not in str(info.value)


# --- RFC 5321 §4.5.3.1 limits ------------------------------------------------

LIMITS = [
    # (path, smtputf8, expected str() or None when too_long)
    # local part: 64 octets
    ("<" + "a" * 64 + "@x.org>", False, "a" * 64 + "@x.org"),
    ("<" + "a" * 65 + "@x.org>", False, None),
    # quotes count towards the 64 octets
    ('<"' + "a " * 31 + '"@x.org>', False, '"' + "a " * 31 + '"@x.org'),
    ('<"' + "a " * 31 + 'a"@x.org>', False, None),
    # octets, not characters: 'é' is two octets in UTF-8
    ("<" + "é" * 32 + "@x.org>", True, "é" * 32 + "@x.org"),
    ("<" + "é" * 32 + "a@x.org>", True, None),
    # whole mailbox: 254 octets
    ("<" + "a" * 64 + "@" + labels(189) + ">", False, "a" * 64 + "@" + labels(189)),
    ("<" + "a" * 64 + "@" + labels(190) + ">", False, None),
    # domain: 255 octets; only reachable through a source route, since a
    # mailbox with a 255-octet domain is already over 254
    ("<@" + labels(255) + ":a@x.org>", False, "a@x.org"),
    ("<@" + labels(256) + ":a@x.org>", False, None),
    ("<a@" + labels(256) + ">", False, None),
    # the A-label form must fit too: 'ü' (2 octets) becomes 'xn--tda' (7)
    ("<@" + ".".join(["ü"] * 32) + ":a@x.org>", True, "a@x.org"),
    ("<@" + ".".join(["ü"] * 33) + ":a@x.org>", True, None),
    ("<a@" + ".".join(["ü"] * 33) + ">", True, None),
]


@pytest.mark.parametrize("path, smtputf8, expected", LIMITS)
def test_length_limits(path, smtputf8, expected):
    if expected is None:
        with pytest.raises(AddressError) as info:
            rcpt(path, smtputf8=smtputf8)
        assert info.value.kind == "too_long"
    else:
        assert str(rcpt(path, smtputf8=smtputf8)) == expected


# --- split_command_arg ----------------------------------------------------

SPLITS = [
    # (arg, keyword, expected)
    ("FROM:<a@b>", "FROM", ("<a@b>", "")),
    ("from: <a@b> SIZE=1", "FROM", ("<a@b>", "SIZE=1")),
    ("From:<> BODY=8BITMIME", "FROM", ("<>", "BODY=8BITMIME")),
    ("TO:<\"x>y\"@z> NOTIFY=NEVER", "TO", ('<"x>y"@z>', "NOTIFY=NEVER")),
    ('TO:<"a\\">"@z>', "TO", ('<"a\\">"@z>', "")),
    ("to:<a@b>   SIZE=1  BODY=7BIT  ", "TO", ("<a@b>", "SIZE=1  BODY=7BIT")),
    ("TO:<postmaster>", "to", ("<postmaster>", "")),
    ("TO:<@r.example:a@b>", "TO", ("<@r.example:a@b>", "")),
    # a quote after the path's end does not change where it ends
    ('TO:<a@b> ORCPT=rfc822;"q"@c>', "TO", ("<a@b>", 'ORCPT=rfc822;"q"@c>')),
]


@pytest.mark.parametrize("arg, keyword, expected", SPLITS)
def test_split_command_arg(arg, keyword, expected):
    assert split_command_arg(arg, keyword) == expected


BAD_SPLITS = [
    ("FROM<a@b>", "FROM"),
    ("FROM:a@b", "FROM"),
    ("FROM :<a@b>", "FROM"),
    ("FROM:  <a@b>", "FROM"),
    ("FROM:<a@b", "FROM"),
    ("FROM:<a@b>SIZE=1", "FROM"),
    ('FROM:<"a>', "FROM"),
    ("TO:<a@b>", "FROM"),
    ("FROM:<a@b>", "TO"),
    ('FROM:<"a>b@c', "FROM"),  # the only '>' is inside the quotes
    ("", "FROM"),
    ("FROM", "FROM"),
    (" FROM:<a@b>", "FROM"),
]


@pytest.mark.parametrize("arg, keyword", BAD_SPLITS)
def test_split_command_arg_invalid(arg, keyword):
    with pytest.raises(AddressError) as info:
        split_command_arg(arg, keyword)
    assert info.value.kind == "syntax"


# --- parse_params ---------------------------------------------------------

PARAMS = [
    ("", {}),
    ("SIZE=100", {"SIZE": "100"}),
    ("size=100 body=8BITMIME", {"SIZE": "100", "BODY": "8BITMIME"}),
    ("SMTPUTF8", {"SMTPUTF8": None}),
    ("A=1   B=2", {"A": "1", "B": "2"}),
    ("X-Foo=bar SMTPUTF8 Ret=hdrs", {"X-FOO": "bar", "SMTPUTF8": None, "RET": "hdrs"}),
    ("ORCPT=rfc822;a+2Bb@c", {"ORCPT": "rfc822;a+2Bb@c"}),
    ("ENVID=é", {"ENVID": "é"}),
    ("1X=~!", {"1X": "~!"}),
]


@pytest.mark.parametrize("rest, expected", PARAMS)
def test_parse_params(rest, expected):
    assert parse_params(rest) == expected


BAD_PARAMS = [
    "SIZE=",
    "SIZE=1 size=2",
    "SMTPUTF8 SMTPUTF8",
    "-X=1",
    "S_Z=1",
    "=1",
    "A=b=c",
    "A=b\tc",
    "A\tB",
    "A=\x7f",
    "A=\x00",
    "É=1",
    "A=\udce9",
]


@pytest.mark.parametrize("rest", BAD_PARAMS)
def test_parse_params_invalid(rest):
    with pytest.raises(AddressError) as info:
        parse_params(rest)
    assert info.value.kind == "param"


# --- xtext ----------------------------------------------------------------

XTEXT = [
    ("", ""),
    ("abc", "abc"),
    ("a+2Bb", "a+b"),
    ("+3D", "="),
    ("user+40example.com", "user@example.com"),
    ("+C3+A9", "é"),
    ("~!", "~!"),
]


@pytest.mark.parametrize("value, expected", XTEXT)
def test_xtext_decode(value, expected):
    assert xtext_decode(value) == expected


@pytest.mark.parametrize("value", ["a+2b", "a+", "a+4", "a+GG", "a=b", "a b", "é", "+FF", "a\x00"])
def test_xtext_decode_invalid(value):
    with pytest.raises(AddressError) as info:
        xtext_decode(value)
    assert info.value.kind == "param"


# --- value validators -------------------------------------------------------

VALID_VALUES = [
    (parse_size, "0", 0),
    (parse_size, "12345", 12345),
    (parse_size, "0" * 19 + "7", 7),
    (parse_size, "9" * 20, 99999999999999999999),
    (parse_body, "7bit", "7BIT"),
    (parse_body, "8BITMIME", "8BITMIME"),
    (parse_body, "8bitMime", "8BITMIME"),
    (parse_ret, "full", "FULL"),
    (parse_ret, "HDRS", "HDRS"),
    (parse_envid, "QQ314159", "QQ314159"),
    (parse_envid, "a+2Bb", "a+b"),
    (parse_envid, "x" * 100, "x" * 100),
    (parse_envid, "+41" * 100, "A" * 100),
    (parse_envid, "a+20b", "a b"),
    (parse_notify, "NEVER", ("NEVER",)),
    (parse_notify, "never", ("NEVER",)),
    (parse_notify, "DELAY", ("DELAY",)),
    (parse_notify, "success,failure", ("SUCCESS", "FAILURE")),
    (parse_notify, "FAILURE,DELAY,SUCCESS", ("FAILURE", "DELAY", "SUCCESS")),
    (parse_orcpt, "rfc822;user+40example.com", ("rfc822", "user@example.com")),
    (parse_orcpt, "RFC822;a@b", ("rfc822", "a@b")),
    (parse_orcpt, "utf-8;x\\x{E9}@y", ("utf-8", "x\\x{E9}@y")),
    (parse_orcpt, "rfc822;a+20b@c", ("rfc822", "a b@c")),
    (parse_orcpt, "rfc822;" + "a" * 493, ("rfc822", "a" * 493)),
    (parse_mt_priority, "0", 0),
    (parse_mt_priority, "9", 9),
    (parse_mt_priority, "-9", -9),
    (parse_mt_priority, "+3", 3),
    (parse_mt_priority, "-0", 0),
]


@pytest.mark.parametrize("func, value, expected", VALID_VALUES)
def test_validators_accept(func, value, expected):
    assert func(value) == expected


INVALID_VALUES = [
    (parse_size, None),
    (parse_size, ""),
    (parse_size, "-1"),
    (parse_size, "1.5"),
    (parse_size, " 1"),
    (parse_size, "9" * 21),
    (parse_size, "١٢"),
    (parse_body, None),
    (parse_body, "BINARYMIME"),
    (parse_body, "8BIT"),
    (parse_body, "8bıtmıme"),  # dotless i upper-cases to I
    (parse_ret, None),
    (parse_ret, ""),
    (parse_ret, "ALL"),
    (parse_envid, None),
    (parse_envid, "x" * 101),
    (parse_envid, "a+0D+0Ab"),
    (parse_envid, "a+C3+A9"),
    (parse_envid, "a+2b"),
    (parse_notify, None),
    (parse_notify, ""),
    (parse_notify, "NEVER,SUCCESS"),
    (parse_notify, "SUCCESS,NEVER"),
    (parse_notify, "SUCCESS,SUCCESS"),
    (parse_notify, "SUCCESS,"),
    (parse_notify, "ALWAYS"),
    (parse_notify, "SUCCESS FAILURE"),
    (parse_orcpt, None),
    (parse_orcpt, "rfc822"),
    (parse_orcpt, ";a@b"),
    (parse_orcpt, "rfc822;"),
    (parse_orcpt, "rfc 822;a@b"),
    (parse_orcpt, "rfc822;a+0D+0Ab"),
    (parse_orcpt, "rfc822;a=b"),
    (parse_orcpt, "rfc822;+C3+A9@b"),
    (parse_orcpt, "rfc822;" + "a" * 494),
    (parse_mt_priority, None),
    (parse_mt_priority, ""),
    (parse_mt_priority, "10"),
    (parse_mt_priority, "-10"),
    (parse_mt_priority, "+"),
    (parse_mt_priority, "a"),
    (parse_mt_priority, "1.0"),
    (parse_mt_priority, " 1"),
    (parse_mt_priority, "٣"),
]


@pytest.mark.parametrize("func, value", INVALID_VALUES)
def test_validators_refuse(func, value):
    with pytest.raises(AddressError) as info:
        func(value)
    assert info.value.kind == "param"


def test_binarymime_refusal_says_why():
    with pytest.raises(AddressError, match="BINARYMIME is not supported"):
        parse_body("binarymime")


# --- Address ----------------------------------------------------------------

ADDRESS_STR = [
    (Address("", "", ""), ""),
    (Address("postmaster", "", ""), "postmaster"),
    (Address("a", "example.com", "example.com"), "a@example.com"),
    (Address("a b", "example.com", "example.com"), '"a b"@example.com'),
    (Address('a"b\\c', "x.org", "x.org"), '"a\\"b\\\\c"@x.org'),
    (Address("a.", "x.org", "x.org"), '"a."@x.org'),
    (Address("josé", "xn--bcher-kva.example", "bücher.example"), "josé@xn--bcher-kva.example"),
]


@pytest.mark.parametrize("address, expected", ADDRESS_STR)
def test_address_str(address, expected):
    assert str(address) == expected


@pytest.mark.parametrize("address, expected", ADDRESS_STR[2:])
def test_address_str_reparses_to_same_address(address, expected):
    assert rcpt("<" + str(address) + ">", smtputf8=True) == address


def test_address_is_frozen():
    address = Address("a", "b", "b")
    with pytest.raises(AttributeError):
        address.local = "c"
