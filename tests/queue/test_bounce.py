import email
import email.policy
import email.utils
import re

import pytest

from elemta.queue.bounce import (
    ACTIONS,
    OriginalMessage,
    RecipientStatus,
    build_report,
    wants_report,
)

NOW = 1700000200.0  # Tue, 14 Nov 2023 22:16:40 +0000
ARRIVAL = 1700000000.0
HEADERS = (
    b"Received: from client.example.com ([192.0.2.7]) by mta.example.com\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <m1@example.com>\r\n"
)
BODY = b"See you at noon.\r\nAlice\r\n"
MESSAGE = HEADERS + b"\r\n" + BODY
REPLY = "550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown"


def original(**kw):
    fields = {"queue_id": "0ABCDEF123456", "sender": "alice@example.com", "arrival": ARRIVAL}
    fields["body"] = MESSAGE
    fields.update(kw)
    return OriginalMessage(**fields)


def failed(**kw):
    fields = {"address": "bob@example.org", "action": "failed", "status": "5.1.1"}
    fields.update(remote_mta="mx.example.org", diagnostic=REPLY, last_attempt=NOW - 60)
    fields.update(kw)
    return RecipientStatus(**fields)


def report(orig=None, recipients=None, **kw):
    kw.setdefault("reporting_mta", "mta.example.com")
    kw.setdefault("now", NOW)
    kw.setdefault("message_id", "dsn.0ABCDEF123456@mta.example.com")
    return build_report(orig or original(), recipients or [failed()], **kw)


def parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def human(msg):
    """Part 1's text with its line wrapping undone."""
    return " ".join(msg.get_payload()[0].get_content().split())


def status_blocks(msg):
    """Part 2 as email exposes message/delivery-status: a list of header blocks."""
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


def field_blocks(raw_part: bytes):
    """A status part parsed by hand (for message/global-delivery-status, which
    email does not split into blocks): a list of {lower-case name: value}."""
    text = raw_part.decode("utf-8").split("\r\n\r\n", 1)[1]
    text = re.sub(r"\r\n[ \t]", " ", text)  # RFC 5322 §2.2.3 unfolding
    blocks = []
    for chunk in text.strip("\r\n").split("\r\n\r\n"):
        block = {}
        for line in chunk.split("\r\n"):
            name, _, value = line.partition(":")
            block[name.lower()] = value.strip()
        blocks.append(block)
    return blocks


def raw_parts(raw):
    boundary = parse(raw).get_boundary().encode()
    pieces = raw.split(b"\r\n--" + boundary)
    return [piece.removeprefix(b"\r\n") for piece in pieces[1:-1]]


# --- structure -----------------------------------------------------------------


def test_report_is_multipart_report_with_three_parts():
    msg = parse(report())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not msg.defects


def test_top_level_header_fields():
    msg = parse(report())
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mta.example.com"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert b"\r\nTo: <alice@example.com>\r\n" in report()
    assert msg["Message-ID"] == "<dsn.0ABCDEF123456@mta.example.com>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert b"\r\nDate: Tue, 14 Nov 2023 22:16:40 +0000\r\n" in report()


def test_message_id_given_in_angle_brackets_is_not_doubled():
    msg = parse(report(message_id="<x@mta.example.com>"))
    assert msg["Message-ID"] == "<x@mta.example.com>"


def test_subject_follows_the_actions():
    delayed = failed(action="delayed", status="4.4.1", will_retry_until=NOW + 86400)
    delivered = failed(action="delivered", status="2.0.0", diagnostic="250 2.0.0 Ok")
    assert parse(report(recipients=[delayed]))["Subject"] == "Delayed Mail (still being retried)"
    assert parse(report(recipients=[delivered]))["Subject"] == "Successful Mail Delivery Report"
    mixed = parse(report(recipients=[delivered, delayed, failed()]))
    assert mixed["Subject"] == "Undelivered Mail Returned to Sender"


def test_human_text_names_recipient_remote_reply_and_queue_id():
    text = human(parse(report()))
    assert "<bob@example.org>" in text
    assert "mx.example.org said:" in text
    assert REPLY in text
    assert "0ABCDEF123456" in text
    assert "header section of the message is attached" in text


# --- message/delivery-status ---------------------------------------------------


def test_per_message_fields():
    per_message = status_blocks(parse(report(original(envid="QQ314159"))))[0]
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["Reporting-MTA"] == "dns; mta.example.com"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"


def test_per_recipient_fields():
    carol = failed(
        address="carol@example.org",
        action="delayed",
        status="4.4.1",
        remote_mta="[192.0.2.1]",
        diagnostic="421 4.4.1 try again later",
        last_attempt=NOW - 30,
        will_retry_until=NOW + 5 * 86400,
    )
    per_message, bob, carol = status_blocks(parse(report(recipients=[failed(), carol])))
    assert "Action" not in per_message
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.org"
    assert bob["Diagnostic-Code"] == "smtp; " + REPLY
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:15:40 +0000"
    assert "Will-Retry-Until" not in bob
    assert carol["Final-Recipient"] == "rfc822; carol@example.org"
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert carol["Remote-MTA"] == "dns; [192.0.2.1]"
    assert carol["Diagnostic-Code"] == "smtp; 421 4.4.1 try again later"


def test_delayed_report_has_will_retry_until():
    delayed = failed(action="delayed", status="4.4.1", will_retry_until=NOW + 86400)
    msg = parse(report(recipients=[delayed]))
    block = status_blocks(msg)[1]
    assert block["Will-Retry-Until"] == "Wed, 15 Nov 2023 22:16:40 +0000"
    assert "retried until Wed, 15 Nov 2023 22:16:40 +0000" in human(msg)


def test_will_retry_until_only_for_delayed():
    block = status_blocks(parse(report(recipients=[failed(will_retry_until=NOW + 60)])))[1]
    assert "Will-Retry-Until" not in block


def test_envid_and_orcpt_passed_through():
    rcpt = failed(orcpt="rfc822;Bob@Example.ORG")
    blocks = status_blocks(parse(report(original(envid="QQ314159"), [rcpt])))
    assert blocks[0]["Original-Envelope-Id"] == "QQ314159"
    assert blocks[1]["Original-Recipient"] == "rfc822;Bob@Example.ORG"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.org"


def test_no_envid_or_orcpt_no_fields():
    # RFC 3461 §6.3 (a) and (d): MUST NOT appear when the parameter was not given.
    raw = report()
    assert b"Original-Envelope-Id" not in raw
    assert b"Original-Recipient" not in raw


def test_optional_recipient_fields_left_out_when_unknown():
    rcpt = RecipientStatus("bob@example.org", "delivered", "2.0.0")
    block = status_blocks(parse(report(recipients=[rcpt])))[1]
    assert set(block.keys()) == {"Final-Recipient", "Action", "Status"}


def test_multi_line_reply_keeps_each_line_on_its_own():
    reply = "550-5.7.1 Message rejected as spam.\r\n550 5.7.1 See https://example.org/why"
    raw = report(recipients=[failed(diagnostic=reply)])
    # RFC 3461 §9.2: each further line of the reply starts a continuation line.
    assert (
        b"Diagnostic-Code: smtp; 550-5.7.1 Message rejected as spam.\r\n"
        b" 550 5.7.1 See https://example.org/why\r\n"
    ) in raw
    block = status_blocks(parse(raw))[1]
    assert block["Diagnostic-Code"] == "smtp; " + reply.replace("\r\n", " ")


def test_local_error_text_gets_private_diagnostic_type():
    rcpt = failed(remote_mta="", diagnostic="connect to mx.example.org: Connection refused")
    block = status_blocks(parse(report(recipients=[rcpt])))[1]
    assert block["Diagnostic-Code"] == "x-elemta; connect to mx.example.org: Connection refused"
    assert "Remote-MTA" not in block


def test_remote_text_cannot_inject_fields():
    rcpt = failed(
        remote_mta="mx.example.org\r\nAction: delivered",
        diagnostic="550 no\r\nAction: delivered\nStatus: 2.0.0",
    )
    raw = report(recipients=[rcpt])
    block = status_blocks(parse(raw))[1]
    assert block.get_all("Action") == ["failed"]
    assert block.get_all("Status") == ["5.1.1"]
    assert not re.search(rb"\r\n(Action|Status): [^f5]", raw)


# --- the returned message ------------------------------------------------------


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_headers_only_without_ret_full(ret):
    raw = report(original(ret=ret))
    part = parse(raw).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert raw_parts(raw)[2].split(b"\r\n\r\n", 1)[1] == HEADERS
    assert BODY not in raw


def test_ret_full_returns_whole_message():
    raw = report(original(ret="FULL"))
    part = parse(raw).get_payload()[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_payload()[0]
    assert inner["Subject"] == "lunch"
    assert inner.get_content() == BODY.decode()
    assert raw_parts(raw)[2].split(b"\r\n\r\n", 1)[1] == MESSAGE
    assert "The message is attached" in human(parse(raw))


def test_ret_full_only_applies_to_failure_reports():
    # RFC 3461 §4.3: a report without failures returns only the header section.
    delayed = failed(action="delayed", status="4.4.1", will_retry_until=NOW + 60)
    raw = report(original(ret="FULL"), [delayed])
    assert parse(raw).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert BODY not in raw


def test_a_requiretls_original_comes_back_as_its_header_only_even_with_ret_full():
    # RFC 8689 §5: the report travels without REQUIRETLS, so the content stays out of it.
    raw = report(original(ret="FULL", requiretls=True))
    assert parse(raw).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert BODY not in raw and "header section of the message is attached" in human(parse(raw))


def test_eight_bit_original_is_labelled_8bit():
    body = HEADERS + b"\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    raw = report(original(ret="FULL", body=body))
    assert raw_parts(raw)[2].split(b"\r\n\r\n", 1)[1] == body
    assert b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n--" in raw  # top level
    assert parse(raw).get_payload()[2]["Content-Transfer-Encoding"] == "8bit"


# --- NOTIFY --------------------------------------------------------------------

NOTIFY_TABLE = {
    # notify: actions that get a report
    (): {"failed", "delayed"},
    ("NEVER",): set(),
    ("SUCCESS",): {"delivered", "relayed", "expanded"},
    ("FAILURE",): {"failed"},
    ("DELAY",): {"delayed"},
    ("SUCCESS", "FAILURE"): {"delivered", "relayed", "expanded", "failed"},
    ("FAILURE", "DELAY"): {"failed", "delayed"},
    ("SUCCESS", "FAILURE", "DELAY"): set(ACTIONS),
    ("failure",): {"failed"},
}


@pytest.mark.parametrize("notify", list(NOTIFY_TABLE))
@pytest.mark.parametrize("action", ACTIONS)
def test_wants_report(notify, action):
    assert wants_report(notify, action) is (action in NOTIFY_TABLE[notify])


def test_wants_report_rejects_unknown_action():
    with pytest.raises(ValueError):
        wants_report((), "bounced")


# --- who gets it ---------------------------------------------------------------


def test_null_sender_is_never_reported_to():
    with pytest.raises(ValueError):
        report(original(sender=""))


def test_postmaster_copy():
    raw = report(original(sender=""), postmaster="postmaster@mta.example.com")
    assert b"\r\nTo: <postmaster@mta.example.com>\r\n" in raw
    msg = parse(raw)
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail Returned to Sender"
    assert "message from <>" in human(msg)


def test_postmaster_copy_of_ordinary_report():
    raw = report(postmaster="postmaster@mta.example.com")
    assert b"\r\nTo: <postmaster@mta.example.com>\r\n" in raw
    msg = parse(raw)
    assert "message from <alice@example.com>" in human(msg)


def test_rejects_empty_recipients_and_unknown_action():
    with pytest.raises(ValueError):
        build_report(original(), [], reporting_mta="m", now=NOW, message_id="a@m")
    with pytest.raises(ValueError):
        report(recipients=[failed(action="bounced")])


# --- line format ---------------------------------------------------------------


def assert_lines_ok(raw):
    assert not re.search(rb"[^\r]\n|\r[^\n]", raw), "bare CR or LF"
    assert raw.endswith(b"\r\n")
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998


def test_all_lines_crlf_and_short_with_long_diagnostic():
    words = "550 5.7.1 " + " ".join(f"word{i:04d}" for i in range(250))
    assert len(words) > 2000
    raw = report(recipients=[failed(diagnostic=words)])
    assert_lines_ok(raw)
    block = status_blocks(parse(raw))[1]
    assert block["Diagnostic-Code"] == "smtp; " + words  # folding lost nothing
    for line in raw_parts(raw)[1].split(b"\r\n"):
        assert len(line) <= 78


def test_all_lines_short_even_without_spaces_to_fold_at():
    unbroken = "550 " + "x" * 2000
    raw = report(recipients=[failed(diagnostic=unbroken)])
    assert_lines_ok(raw)
    block = status_blocks(parse(raw))[1]
    assert block["Diagnostic-Code"].replace(" ", "") == "smtp;" + unbroken.replace(" ", "")


def test_all_lines_crlf_for_every_kind_of_report():
    recipients = [
        failed(),
        failed(address="c@example.org", action="delayed", status="4.0.0", will_retry_until=NOW),
        failed(address="d@example.org", action="delivered", status="2.0.0"),
        failed(address="e@example.org", action="relayed", status="2.0.0"),
        failed(address="f@example.org", action="expanded", status="2.0.0"),
    ]
    for ret in (None, "HDRS", "FULL"):
        assert_lines_ok(report(original(ret=ret), recipients))


# --- international addresses ---------------------------------------------------


def test_utf8_addresses_in_smtputf8_report():
    body = "From: jörg@exämple.de\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    orig = original(sender="jörg@exämple.de", smtputf8=True, body=body)
    rcpt = failed(
        address="bücher@exämple.org",
        orcpt="utf-8;bücher@exämple.org",
        diagnostic="550 5.1.1 unbekannt: bücher",
    )
    raw = report(orig, [rcpt])
    raw.decode("utf-8")  # valid UTF-8 throughout
    assert_lines_ok(raw)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert b"\r\nTo: <j\xc3\xb6rg@ex\xc3\xa4mple.de>\r\n" in raw
    # RFC 6533 §3: the utf-8 address type, UTF-8 kept in a global report.
    block = field_blocks(raw_parts(raw)[1])[1]
    assert block["final-recipient"] == "utf-8; bücher@exämple.org"
    assert block["original-recipient"] == "utf-8;bücher@exämple.org"
    assert block["diagnostic-code"] == "smtp; 550 5.1.1 unbekannt: bücher"
    assert raw_parts(raw)[2].split(b"\r\n\r\n", 1)[1] == body.split(b"\r\n\r\n")[0] + b"\r\n"


def test_utf8_address_without_smtputf8_stays_ascii():
    rcpt = failed(address="bücher@exämple.org", diagnostic="550 5.1.1 unbekannt: bücher")
    raw = report(recipients=[rcpt])
    assert raw.isascii()
    assert_lines_ok(raw)
    block = status_blocks(parse(raw))[1]
    # RFC 6533 §3 utf-8-addr-xtext: non-ASCII as \x{HEX}.
    assert block["Final-Recipient"] == "utf-8; b\\x{FC}cher@ex\\x{E4}mple.org"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannt: b?cher"


def test_smtputf8_original_with_ascii_addresses_gets_classic_report():
    raw = report(original(smtputf8=True))
    assert raw.isascii()
    assert parse(raw).get_payload()[1].get_content_type() == "message/delivery-status"


def test_xtext_specials_are_escaped_in_utf8_addresses():
    rcpt = failed(address="a+b=c@exämple.org")
    block = status_blocks(parse(report(recipients=[rcpt])))[1]
    assert block["Final-Recipient"] == "utf-8; a\\x{2B}b\\x{3D}c@ex\\x{E4}mple.org"


def test_undecodable_reply_bytes_do_not_break_the_report():
    rcpt = failed(diagnostic="550 bad \udcff byte")  # from a surrogateescape decode
    for smtputf8 in (False, True):
        raw = report(original(smtputf8=smtputf8), [rcpt])
        assert status_blocks(parse(raw))[1]["Diagnostic-Code"] == "smtp; 550 bad ? byte"


# --- determinism and boundary --------------------------------------------------


def test_output_is_deterministic():
    recipients = [failed(orcpt="rfc822;bob@example.org"), failed(address="c@example.org")]
    first = report(original(envid="E1", ret="FULL"), recipients)
    assert report(original(envid="E1", ret="FULL"), list(recipients)) == first
    other = report(original(envid="E1", ret="FULL"), recipients, message_id="other@mta")
    assert parse(other).get_boundary() != parse(first).get_boundary()


def test_boundary_does_not_occur_in_content():
    boundary = parse(report(original(ret="FULL"))).get_boundary()
    body = HEADERS + b"\r\n--" + boundary.encode() + b"--\r\n" + BODY
    raw = report(original(ret="FULL", body=body))
    msg = parse(raw)
    assert msg.get_boundary() != boundary
    assert boundary in msg.get_boundary()  # derived the same way, then changed
    assert len(msg.get_payload()) == 3
    assert raw_parts(raw)[2].split(b"\r\n\r\n", 1)[1] == body


# --- a report is recognisable as one -------------------------------------------------


def test_reports_are_delivery_status_reports():
    # RFC 3462 §1 / RFC 6533 §6: what a receiver (and elemta's own loop checks) look for.
    for raw in (report(), report(original(smtputf8=True, sender="jörg@exämple.de"))):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") in ("delivery-status", "global-delivery-status")
