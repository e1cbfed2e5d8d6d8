"""Only ASCII 0-9 are digits in SMTP (RFC 5234 Appendix B.1 DIGIT; issue 16, defect 3).

str.isdigit() and int() also take other scripts' digits ("٣" is 3 to int(), "²" passes
isdigit() but int() refuses it), so every parser of client or remote input must refuse them.
"""

from __future__ import annotations

import pytest

from elemta.delivery.smtp_reply import ProtocolError, parse_line
from elemta.smtp import proxy
from elemta.smtp.address import AddressError, parse_mt_priority, parse_size, xtext_decode

UNICODE_DIGITS = ["\u00b2", "\u0663", "\uff11", "1\u0663", "\u0661\u0660"]


@pytest.mark.parametrize("value", UNICODE_DIGITS)
def test_size_refuses_unicode_digits(value):
    with pytest.raises(AddressError):
        parse_size(value)


@pytest.mark.parametrize("value", ["\u0663", "+\u0663", "-\u00b2"])
def test_mt_priority_refuses_unicode_digits(value):
    with pytest.raises(AddressError):
        parse_mt_priority(value)


def test_xtext_refuses_unicode_hex():
    with pytest.raises(AddressError):
        xtext_decode("a+\u0664\u0661")


@pytest.mark.parametrize("port", ["\u0663", "2\u00b25", "\uff18\uff10"])
def test_proxy_v1_refuses_unicode_port(port):
    line = f"PROXY TCP4 192.0.2.1 192.0.2.2 {port} 25\r\n".encode()
    with pytest.raises(proxy.ProxyError):
        proxy.parse(line)


@pytest.mark.parametrize("raw", ["\u0662\u0665\u0660 ok".encode(), "2\u00b250 ok".encode()])
def test_remote_reply_code_refuses_unicode_digits(raw):
    with pytest.raises(ProtocolError):
        parse_line(raw)


def test_the_other_parsers_of_numbers_take_ascii_digits_only():
    """Remote EHLO SIZE, DMARC pct=, resolver ports, enhanced codes in verdicts, the PID file."""
    from elemta.dnscache import Resolver
    from elemta.plugins import api
    from elemta.plugins.builtin import dmarc

    policy = dmarc.parse_record("v=DMARC1; p=reject; pct=\u0663")
    assert policy is None or policy.pct == 100  # "٣" is no percentage: the default
    with pytest.raises(ValueError, match="port must be 1-65535"):
        Resolver(["127.0.0.1:\u0665\u0663"])
    with pytest.raises(ValueError, match="does not fit"):
        api.reject(550, "5.\u00b2.1", "no")
