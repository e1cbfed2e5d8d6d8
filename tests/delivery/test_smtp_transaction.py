"""delivery/smtp_transaction.py with plain values: the commands a message needs at a server,
and what the server's replies mean, without a socket."""

import pytest

from elemta.delivery.smtp_transaction import AfterData, Failure, OutboundTransaction, OutMessage, OutRecipient
from elemta.reply import Reply

BODY = b"Subject: hi\r\n\r\nhello\r\n"
OK, TAKEN, GO_ON = Reply(250, "2.1.0", "ok"), Reply(250, "2.1.5", "ok"), Reply(354, "", "go on")
UNKNOWN, BUSY = Reply(550, "5.1.1", "no such user"), Reply(451, "4.3.0", "try later")


def message(*recipients, **fields):
    rcpts = tuple(r if isinstance(r, OutRecipient) else OutRecipient(r) for r in recipients or ("b@example.org",))
    return OutMessage(fields.pop("sender", "a@example.net"), rcpts, fields.pop("body", BODY), **fields)


def test_commands_carry_only_the_parameters_the_server_announced():
    msg = message(OutRecipient("b@example.org", ("SUCCESS", "delay"), "rfc822;B@example.org"),
                  envid="id 1", ret="hdrs", body_type="8BITMIME")
    plain = OutboundTransaction(msg, {}, "mx.example")
    assert plain.commands() == ["MAIL FROM:<a@example.net>", "RCPT TO:<b@example.org>"]
    full = OutboundTransaction(msg, {"SIZE": "0", "8BITMIME": "", "DSN": "", "PIPELINING": ""}, "mx.example")
    assert full.pipelining and full.dsn
    assert full.commands() == [
        f"MAIL FROM:<a@example.net> SIZE={len(BODY)} BODY=8BITMIME RET=HDRS ENVID=id+201",
        "RCPT TO:<b@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B@example.org",
    ]


def test_smtputf8_is_asked_for_a_non_ascii_address_or_a_message_that_needs_it():
    assert OutboundTransaction(message("jörg@exämple.de"), {"SMTPUTF8": ""}, "mx").commands()[0].endswith(" SMTPUTF8")
    assert OutboundTransaction(message(smtputf8=True), {"SMTPUTF8": ""}, "mx").commands()[0].endswith(" SMTPUTF8")
    assert " SMTPUTF8" not in OutboundTransaction(message(), {"SMTPUTF8": ""}, "mx").commands()[0]


@pytest.mark.parametrize(("msg", "extensions", "refusal"), [
    (message("b@example.org>"), {}, (553, "5.1.3")),
    (message("b@exa\rmple.org"), {}, (553, "5.1.3")),
    (message(body_type="BINARYMIME"), {}, (554, "5.6.3")),
    (message(body=b"x" * 101), {"SIZE": "100"}, (552, "5.3.4")),
    (message("jörg@exämple.de"), {}, (553, "5.6.7")),
    (message(smtputf8=True), {}, (553, "5.6.9")),
])
def test_what_the_server_cannot_take_is_refused_before_mail(msg, extensions, refusal):
    t = OutboundTransaction(msg, extensions, "mx.example")
    assert (t.refusal.code, t.refusal.enhanced) == refusal
    assert [r.reply for r in t.refused()] == [t.refusal] * len(msg.recipients)


@pytest.mark.parametrize("size", ["0", "", "١٠٠", "junk"])
def test_a_size_of_zero_or_not_ascii_digits_is_no_limit(size):
    assert OutboundTransaction(message(body=b"x" * 1000), {"SIZE": size}, "mx").refusal is None


def test_a_transient_mail_reply_fails_the_transaction_for_the_next_host():
    t = OutboundTransaction(message(), {}, "mx")
    after = t.after_data(BUSY, [], None)
    assert after == AfterData(abandon=True, failure=Failure("mail", "sender refused", BUSY))


def test_a_permanent_mail_reply_is_every_recipient_s_result():
    t = OutboundTransaction(message("b@example.org", "c@example.org"), {}, "mx")
    refused = Reply(553, "5.7.1", "sender refused")
    assert t.after_data(refused, [], None) == AfterData(abandon=True)
    assert [r.reply for r in t.results(refused, [], [])] == [refused, refused]


def test_recipients_refused_at_rcpt_keep_their_own_reply_and_the_rest_get_the_final_one():
    t = OutboundTransaction(message("b@example.org", "c@example.org", "d@example.org"), {}, "mx")
    rcpts = [TAKEN, UNKNOWN, TAKEN]
    assert t.after_data(OK, rcpts, GO_ON) == AfterData(send_body=True)
    queued = Reply(250, "2.0.0", "queued")
    results = t.results(OK, rcpts, [queued, queued])
    assert [r.reply for r in results] == [queued, UNKNOWN, queued]
    assert [(r.is_positive, r.is_permanent) for r in results] == [(True, False), (False, True), (True, False)]


def test_no_recipient_taken_ends_the_transaction_without_text():
    t = OutboundTransaction(message("b@example.org", "c@example.org"), {"PIPELINING": ""}, "mx")
    after = t.after_data(OK, [UNKNOWN, BUSY], Reply(554, "5.5.1", "no valid recipients"))
    assert after == AfterData(abandon=True)
    assert [r.reply for r in t.results(OK, [UNKNOWN, BUSY], after.finals)] == [UNKNOWN, BUSY]
    assert t.results(OK, [UNKNOWN, BUSY], [])[1].is_transient


def test_a_refused_data_is_the_result_of_every_recipient_taken():
    t = OutboundTransaction(message("b@example.org", "c@example.org"), {}, "mx")
    refused = Reply(554, "5.3.0", "no")
    after = t.after_data(OK, [TAKEN, UNKNOWN], refused)
    assert after == AfterData(abandon=True, finals=[refused])
    assert [r.reply for r in t.results(OK, [TAKEN, UNKNOWN], after.finals)] == [refused, UNKNOWN]


@pytest.mark.parametrize("data", [None, Reply(250, "2.0.0", "ok")])
def test_no_354_after_a_recipient_was_taken_is_a_protocol_failure(data):
    after = OutboundTransaction(message(), {}, "mx").after_data(OK, [TAKEN], data)
    assert after.failure == Failure("data", "unexpected reply to DATA", data, "4.5.0")
    assert not after.abandon and not after.send_body


def test_lmtp_finals_are_one_per_recipient_taken():
    t = OutboundTransaction(message("b@example.org", "c@example.org"), {}, "localhost")
    full = Reply(452, "4.2.2", "mailbox full")
    results = t.results(OK, [TAKEN, TAKEN], [Reply(250, "2.0.0", "ok"), full])
    assert [r.is_positive for r in results] == [True, False] and results[1].is_transient


def test_notify_success_without_dsn_at_the_server_is_relayed():
    msg = message(OutRecipient("b@example.org", ("SUCCESS",)), OutRecipient("c@example.org", ("FAILURE",)))
    queued = Reply(250, "2.0.0", "queued")
    no_dsn = OutboundTransaction(msg, {}, "mx").results(OK, [TAKEN, TAKEN], [queued, queued])
    assert [r.relayed for r in no_dsn] == [True, False]
    with_dsn = OutboundTransaction(msg, {"DSN": ""}, "mx").results(OK, [TAKEN, TAKEN], [queued, queued])
    assert [r.relayed for r in with_dsn] == [False, False]
