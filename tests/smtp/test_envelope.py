"""smtp/envelope.py: the Received field's parts that are computed once and kept."""

from __future__ import annotations

import email.utils

from elemta.smtp.envelope import _address_literal, date_field


def test_date_field_is_formatdate_of_the_second_and_changes_with_it():
    now = 1_700_000_000.25
    assert date_field(now) == email.utils.formatdate(int(now), localtime=True)
    assert date_field(now + 0.5) == date_field(now)  # the same second, the kept text
    later = date_field(now + 1)
    assert later == email.utils.formatdate(int(now) + 1, localtime=True) and later != date_field(now)


def test_address_literal_of_both_families():
    assert _address_literal("192.0.2.1") == "[192.0.2.1]"
    assert _address_literal("2001:db8:0::1") == "[IPv6:2001:db8::1]"  # RFC 5321 §4.1.3, compressed
