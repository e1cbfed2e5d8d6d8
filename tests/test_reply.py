"""elemta/reply.py: the one reply type, and that every side of elemta uses it."""

import pytest

from elemta import reply
from elemta.delivery import smtp_client, smtp_reply
from elemta.plugins import api
from elemta.reply import Reply
from elemta.smtp import replies


@pytest.mark.parametrize(("code", "kind"), [
    (220, "positive"), (250, "positive"), (299, "positive"),
    (334, "intermediate"), (354, "intermediate"),
    (421, "transient"), (451, "transient"), (499, "transient"),
    (500, "permanent"), (550, "permanent"), (554, "permanent"),
])
def test_the_kind_follows_from_the_first_digit(code, kind):
    r = Reply(code, "", "x")
    assert (r.is_positive, r.is_intermediate, r.is_transient, r.is_permanent) == tuple(
        kind == k for k in ("positive", "intermediate", "transient", "permanent"))


def test_wire_form_repeats_code_and_enhanced_code_on_every_line():
    r = Reply(250, "2.0.0", "first\nsecond\nlast")
    assert r.to_bytes() == b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 last\r\n"
    assert Reply(220, "", "mx.example ESMTP").to_bytes() == b"220 mx.example ESMTP\r\n"


def test_log_form_is_one_line():
    assert str(Reply(550, "5.1.1", "no such user\nat all")) == "550 5.1.1 no such user at all"
    assert str(Reply(250, "", "ok")) == "250 ok"


def test_format_fills_fields_and_keeps_the_rest():
    r = Reply(421, "4.7.0", "{host} busy").format(host="mx.example")
    assert r == Reply(421, "4.7.0", "mx.example busy")


def test_server_client_and_plugins_share_the_type():
    assert replies.Reply is smtp_reply.Reply is smtp_client.Reply is reply.Reply
    assert isinstance(replies.QUEUED, Reply)
    parsed = smtp_reply.build_reply([(550, True, "5.1.1 no such user")])
    assert type(parsed) is Reply and parsed.is_permanent and parsed.enhanced == "5.1.1"
    refusal = api.reject(550, "5.7.1", "no").reply
    assert refusal == Reply(550, "5.7.1", "no") and refusal.is_permanent
    assert api.defer().reply.is_transient
    assert api.CONTINUE.reply is None and api.ACCEPT.reply is None
