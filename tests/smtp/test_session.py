"""The sans-IO session, driven with plain bytes: dialogues are data, one driver plays them.

A dialogue is a list of (client input, expected replies) steps; each expected reply is
"CODE ESC" (or "CODE" where RFC 2034 puts no enhanced code), and "close" means the session
ended.  After every step the driver checks that exactly the expected replies came out.
"""

from __future__ import annotations

import itertools

import pytest

from elemta.errors import QueueError, QueueFullError
from elemta.smtp import replies
from elemta.smtp.envelope import mt_priority_class
from elemta.smtp.session import CLOSED, Client, Close, Enqueue, Services, Session, Settings
from elemta.smtp.tls import TlsInfo

HOST = "mx.test.example"


def make_session(trusted=False, role="mx", **overrides) -> tuple[Session, list]:
    settings = {
        "hostname": HOST, "role": role, "max_message_size": 2000, "max_recipients": 3,
        "max_errors": 5, "max_received_headers": 3, "local_domains": frozenset({"local.example"}),
        "relay_domains": frozenset({"relay.example", ".sub.example"}),
    }
    settings.update(overrides)
    counter = itertools.count(1)
    logged: list = []
    services = Services(
        new_id=lambda: f"Q{next(counter):04d}",
        log=lambda event, **fields: logged.append((event, fields)),
        now=lambda: 1_700_000_000.0,
    )
    return Session(Settings(**settings), Client("192.0.2.7", 4242, trusted), services), logged


def codes(outputs) -> list[str]:
    result = []
    for item in outputs:
        if isinstance(item, Enqueue):
            result.append("enqueue")
        elif isinstance(item, Close):
            result.append("close")
        else:
            result.append(f"{item.code} {item.enhanced}".strip())
    return result


def play(session: Session, steps) -> list:
    """Feed each step; return every Enqueue seen. Enqueues succeed with their own ID."""
    enqueued = []
    for data, expected in steps:
        outputs = session.feed(data)
        while outputs and isinstance(outputs[-1], Enqueue):
            item = outputs.pop()
            enqueued.append(item.message)
            outputs += [item] + session.enqueued(item.message)
        assert codes(outputs) == expected, f"after {data[:60]!r}"
    return enqueued


EHLO = (b"EHLO client.example\r\n", ["250"])
MAIL = (b"MAIL FROM:<a@sender.example>\r\n", ["250 2.1.0"])
RCPT = (b"RCPT TO:<b@local.example>\r\n", ["250 2.1.5"])
DATA = (b"DATA\r\n", ["354"])
BODY_OK = (b"Subject: t\r\n\r\nhello\r\n.\r\n", ["enqueue", "250 2.0.0"])

DIALOGUES = {
    "simple": [EHLO, MAIL, RCPT, DATA, BODY_OK, (b"QUIT\r\n", ["221 2.0.0", "close"])],
    "helo then mail": [(b"HELO c\r\n", ["250"]), MAIL, RCPT, DATA, BODY_OK],
    "order: mail before helo": [(b"MAIL FROM:<a@b.example>\r\n", ["503 5.5.1"])],
    "order: rcpt before mail": [EHLO, (b"RCPT TO:<b@local.example>\r\n", ["503 5.5.1"])],
    "order: data before helo": [(b"DATA\r\n", ["503 5.5.1"])],
    "order: data before mail": [EHLO, (b"DATA\r\n", ["503 5.5.1"])],
    "order: data without rcpt": [EHLO, MAIL, (b"DATA\r\n", ["503 5.5.1"])],
    "order: nested mail": [EHLO, MAIL, (b"MAIL FROM:<c@d.example>\r\n", ["503 5.5.1"])],
    "rset keeps greeting": [EHLO, MAIL, RCPT, (b"RSET\r\n", ["250 2.0.0"]), (b"DATA\r\n", ["503 5.5.1"]), MAIL],
    "rset with argument": [(b"RSET FOO\r\n", ["501 5.5.4"])],
    "ehlo resets transaction": [EHLO, MAIL, RCPT, EHLO, (b"DATA\r\n", ["503 5.5.1"])],
    "helo without argument": [(b"HELO\r\n", ["501 5.5.4"]), (b"EHLO\r\n", ["501 5.5.4"])],
    "null sender": [EHLO, (b"MAIL FROM:<>\r\n", ["250 2.1.0"])],
    "null recipient": [EHLO, MAIL, (b"RCPT TO:<>\r\n", ["501 5.1.3"])],
    "postmaster without domain": [
        EHLO, MAIL, (b"RCPT TO:<postmaster>\r\n", ["250 2.1.5"]), (b"RCPT TO:<Postmaster>\r\n", ["250 2.1.5"]),
    ],
    "recipient without domain": [EHLO, MAIL, (b"RCPT TO:<a>\r\n", ["501 5.1.3"])],
    "sender without domain": [EHLO, (b"MAIL FROM:<pepe>\r\n", ["501 5.1.7"])],
    "bad a-label": [EHLO, MAIL, (b"RCPT TO:<a@xn--->\r\n", ["501 5.1.3"])],
    "relay denied": [EHLO, MAIL, (b"RCPT TO:<x@elsewhere.example>\r\n", ["550 5.7.1"])],
    "relay domain and subdomain": [
        EHLO, MAIL, (b"RCPT TO:<x@relay.example>\r\n", ["250 2.1.5"]),
        (b"RCPT TO:<x@a.sub.example>\r\n", ["250 2.1.5"]), (b"RCPT TO:<x@sub.example.org>\r\n", ["550 5.7.1"]),
    ],
    "too many recipients": [
        EHLO, MAIL, RCPT, (b"RCPT TO:<c@local.example>\r\n", ["250 2.1.5"]),
        (b"RCPT TO:<d@local.example>\r\n", ["250 2.1.5"]), (b"RCPT TO:<e@local.example>\r\n", ["452 4.5.3"]),
    ],
    "unknown mail parameter": [EHLO, (b"MAIL FROM:<a@b.example> FOO\r\n", ["555 5.5.4"])],
    "size within limit": [EHLO, (b"MAIL FROM:<a@b.example> SIZE=1999\r\n", ["250 2.1.0"])],
    "size over limit": [EHLO, (b"MAIL FROM:<a@b.example> SIZE=2001\r\n", ["552 5.3.4"])],
    "body 8bitmime": [EHLO, (b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n", ["250 2.1.0"])],
    "body 9bit": [EHLO, (b"MAIL FROM:<a@b.example> BODY=9BIT\r\n", ["501 5.5.4"])],
    "size on rcpt": [EHLO, MAIL, (b"RCPT TO:<b@local.example> SIZE=\r\n", ["555 5.5.4"])],
    "smtputf8 with value": [EHLO, (b"MAIL FROM:<a@b.example> SMTPUTF8=YES\r\n", ["501 5.5.4"])],
    "params after helo": [(b"HELO c\r\n", ["250"]), (b"MAIL FROM:<a@b.example> SIZE=10\r\n", ["501 5.5.4"])],
    "utf8 without smtputf8": [EHLO, ("MAIL FROM:<jösé@b.example>\r\n".encode(), ["553 5.6.7"])],
    "utf8 with smtputf8": [
        EHLO, ("MAIL FROM:<jösé@b.example> SMTPUTF8\r\n".encode(), ["250 2.1.0"]),
        ("RCPT TO:<ü@local.example>\r\n".encode(), ["250 2.1.5"]),
    ],
    "dsn parameters": [
        EHLO, (b"MAIL FROM:<a@b.example> RET=HDRS ENVID=abc+2Bdef\r\n", ["250 2.1.0"]),
        (b"RCPT TO:<b@local.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40local.example\r\n", ["250 2.1.5"]),
        (b"RCPT TO:<c@local.example> NOTIFY=NEVER,SUCCESS\r\n", ["501 5.5.4"]),
    ],
    "vrfy expn help noop": [
        (b"VRFY someone\r\n", ["252 2.5.0"]), (b"EXPN list\r\n", ["502 5.5.1"]),
        (b"HELP\r\n", ["214 2.0.0"]), (b"NOOP anything\r\n", ["250 2.0.0"]), (b"VRFY\r\n", ["501 5.5.4"]),
    ],
    "unknown command": [(b"FOO\r\n", ["500 5.5.1"])],
    "http as first command": [(b"GET / HTTP/1.1\r\n", ["502 5.5.1", "close"])],
    "connect as first command": [(b"CONNECT mx:25 HTTP/1.0\r\n", ["502 5.5.1", "close"])],
    "get later is just unknown": [EHLO, (b"GET /\r\n", ["500 5.5.1"])],
    "error budget": [(b"FOO\r\n", ["500 5.5.1"])] * 4 + [(b"FOO\r\n", ["500 5.5.1", "421 4.7.0", "close"])],
    "quit with argument": [(b"QUIT now\r\n", ["501 5.5.4"])],
    "command line 512 is fine": [(b"NOOP " + b"x" * 505 + b"\r\n", ["250 2.0.0"])],
    "command line 513 is too long": [(b"NOOP " + b"x" * 506 + b"\r\n", ["500 5.5.2"]), (b"NOOP\r\n", ["250 2.0.0"])],
    "long command in pieces": [
        (b"NOOP " + b"x" * 600, []), (b"x" * 100000, []), (b"x\r\nNOOP\r\n", ["500 5.5.2", "250 2.0.0"]),
    ],
    "bare lf command accepted": [(b"NOOP\n", ["250 2.0.0"])],
    "empty message": [EHLO, MAIL, RCPT, DATA, (b".\r\n", ["enqueue", "250 2.0.0"])],
    "message in pieces": [
        EHLO, MAIL, RCPT, DATA, (b"Subject: x\r\n\r\nab", []), (b"c\r\n.", []), (b"\r", []), (b"\n", ["enqueue", "250 2.0.0"]),
    ],
    "pipelined transaction": [
        EHLO,
        (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<b@local.example>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n",
         ["250 2.1.0", "250 2.1.5", "550 5.7.1", "354"]),
        BODY_OK,
    ],
    "body before 354 is a sync error": [
        EHLO, MAIL, RCPT, (b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n", ["554 5.5.0", "close"]),
    ],
    "pipelined after end of data": [
        EHLO, MAIL, RCPT, DATA, (b"hi\r\n.\r\nQUIT\r\n", ["enqueue", "250 2.0.0", "221 2.0.0", "close"]),
    ],
    "bare lf before terminator is refused after real end": [
        EHLO, MAIL, RCPT, DATA, (b"Testing\n.\r\nNO SMUGGLING\r\n", []), (b".\r\n", ["550 5.6.0"]), MAIL,
    ],
    "bare cr refused": [EHLO, MAIL, RCPT, DATA, (b"a\rb\r\n.\r\n", ["550 5.6.0"])],
    "text line 998 is fine": [EHLO, MAIL, RCPT, DATA, (b"x" * 998 + b"\r\n.\r\n", ["enqueue", "250 2.0.0"])],
    "text line 999 is too long": [EHLO, MAIL, RCPT, DATA, (b"x" * 999 + b"\r\n.\r\n", ["500 5.6.0"])],
    "stuffed 998 line is fine": [EHLO, MAIL, RCPT, DATA, (b"." + b"x" * 998 + b"\r\n.\r\n", ["enqueue", "250 2.0.0"])],
    "oversized message read to its end": [
        EHLO, MAIL, RCPT, DATA, ((b"x" * 900 + b"\r\n") * 3, []), (b".\n", []), (b"HELP\r\nHELP\r\n", []),
        (b".\r\n", ["552 5.3.4"]), (b"NOOP\r\n", ["250 2.0.0"]),
    ],
    "mail loop": [
        EHLO, MAIL, RCPT, DATA, (b"Received: a\r\nreceived: b\r\nRECEIVED: c\r\n\r\nx\r\n.\r\n", ["554 5.4.6"]),
    ],
    "received in body does not count": [
        EHLO, MAIL, RCPT, DATA, (b"Subject: x\r\n\r\nReceived: a\r\nReceived: b\r\nReceived: c\r\n.\r\n", ["enqueue", "250 2.0.0"]),
    ],
    "bdat": [
        EHLO, MAIL, RCPT, (b"BDAT 5\r\nhello", ["250 2.0.0"]), (b"BDAT 2 LAST\r\n\r\n", ["enqueue", "250 2.0.0"]),
    ],
    "bdat pipelined": [
        EHLO, MAIL, RCPT, (b"BDAT 3\r\nab\nBDAT 0 LAST\r\nNOOP\r\n", ["250 2.0.0", "550 5.6.0", "250 2.0.0"]),
    ],
    "bdat chunk holding commands": [
        EHLO, MAIL, RCPT, (b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\n", ["enqueue", "250 2.0.0"]),
    ],
    "bdat without mail still reads the chunk": [
        EHLO, (b"BDAT 6\r\nQUIT\r\n", ["503 5.5.1"]), (b"NOOP\r\n", ["250 2.0.0"]),
    ],
    "bdat too big": [
        EHLO, MAIL, RCPT, (b"BDAT 2500 LAST\r\n" + b"x" * 2500, ["552 5.3.4"]), (b"BDAT 1 LAST\r\nx", ["503 5.5.1"]),
    ],
    "bdat bad syntax": [EHLO, MAIL, RCPT, (b"BDAT x\r\n", ["501 5.5.4"]), (b"BDAT 1 FIRST\r\n", ["501 5.5.4"])],
    # Issue 16 defect 3: only ASCII 0-9 are DIGITs (RFC 5234 B.1); "²" gave 451 and a
    # traceback, "٣" was read as a 3-octet chunk.
    "bdat unicode digit": [
        EHLO, MAIL, RCPT, ("BDAT \u00b2 LAST\r\n".encode(), ["501 5.5.4"]),
        ("BDAT \u0663\r\nabcNOOP\r\n".encode(), ["501 5.5.4", "500 5.5.1"]),
        ("BDAT \uff11 LAST\r\n".encode(), ["501 5.5.4"]),
    ],
    "data after bdat": [EHLO, MAIL, RCPT, (b"BDAT 2\r\nab", ["250 2.0.0"]), (b"DATA\r\n", ["503 5.5.1"])],
}


@pytest.mark.parametrize("name", list(DIALOGUES))
def test_dialogue(name):
    session, _ = make_session()
    play(session, DIALOGUES[name])


def test_message_is_unstuffed_and_gets_received_header():
    session, _ = make_session()
    body = b"Subject: dots\r\n\r\n.From\r\n..x\r\n..\r\n.This\r\n"
    [message] = play(session, [EHLO, MAIL, RCPT, DATA, (body + b".\r\n", ["enqueue", "250 2.0.0"])])
    received = message.body.partition(b"\r\n\t")[0]
    assert received == b"Received: from client.example ([192.0.2.7])"
    header_end = message.body.index(b"Subject:")
    assert b"by mx.test.example (elemta) with ESMTP id Q0001" in message.body[:header_end]
    assert b"for <b@local.example>;" in message.body[:header_end]
    assert message.body[header_end:] == b"Subject: dots\r\n\r\nFrom\r\n.x\r\n.\r\nThis\r\n"
    assert message.sender == "a@sender.example"
    assert [r.address for r in message.recipients] == ["b@local.example"]


def test_envelope_reaches_the_queue_message():
    session, _ = make_session(trusted=True)
    [message] = play(session, [
        EHLO,
        ("MAIL FROM:<ä@b.example> SMTPUTF8 BODY=8BITMIME RET=FULL ENVID=e1 MT-PRIORITY=6\r\n".encode(), ["250 2.1.0"]),
        (b"RCPT TO:<x@anywhere.example> NOTIFY=DELAY ORCPT=rfc822;x+40anywhere.example\r\n", ["250 2.1.5"]),
        (b"RCPT TO:<x@anywhere.example>\r\n", ["250 2.1.5"]),
        DATA, ("Subject: é\r\n\r\n8bit ü\r\n.\r\n".encode(), ["enqueue", "250 2.0.0"]),
    ])
    assert message.smtputf8 and message.body_type == "8BITMIME"
    assert (message.ret, message.envid, message.priority) == ("FULL", "e1", "critical")
    assert len(message.recipients) == 1  # the duplicate RCPT is kept once
    assert message.recipients[0].notify == ("DELAY",)
    assert message.recipients[0].orcpt == "rfc822;x@anywhere.example"
    assert b"with UTF8SMTP id" in message.body
    assert message.body.endswith("Subject: é\r\n\r\n8bit ü\r\n".encode())


def test_mt_priority_ignored_from_untrusted_client():
    session, _ = make_session(trusted=False)
    assert "MT-PRIORITY MIXER" not in session.feed(b"EHLO c\r\n")[0].text
    play(session, [(b"MAIL FROM:<a@b.example> MT-PRIORITY=9\r\n", ["250 2.1.0"])])
    assert session.envelope.priority == "normal"
    trusted, _ = make_session(trusted=True)
    assert "MT-PRIORITY MIXER" in trusted.feed(b"EHLO c\r\n")[0].text


@pytest.mark.parametrize("level, expected", [
    (-9, "low"), (-1, "low"), (0, "normal"), (1, "high"), (4, "high"), (5, "critical"), (9, "critical"),
])
def test_mt_priority_classes(level, expected):
    assert mt_priority_class(level) == expected


def test_ehlo_advertises_extensions():
    session, _ = make_session()
    [reply] = session.feed(b"EHLO c\r\n")
    assert reply.text.split("\n") == [
        HOST, "PIPELINING", "SIZE 2000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN",
    ]
    assert reply.to_bytes().startswith(b"250-mx.test.example\r\n250-PIPELINING\r\n")
    assert reply.to_bytes().endswith(b"250 DSN\r\n")


def test_submission_requires_trusted_client_until_auth():
    untrusted, _ = make_session(role="submission")
    play(untrusted, [EHLO, (b"MAIL FROM:<a@b.example>\r\n", ["530 5.7.0"])])
    trusted, _ = make_session(role="submission", trusted=True)
    play(trusted, [EHLO, MAIL, (b"RCPT TO:<x@anywhere.example>\r\n", ["250 2.1.5"])])
    open_, _ = make_session(role="submission", auth_required=False)
    play(open_, [EHLO, MAIL, (b"RCPT TO:<x@anywhere.example>\r\n", ["250 2.1.5"])])


def test_dev_mode_accepts_everything():
    session, _ = make_session(accept_all=True, hold=True)
    [message] = play(session, [
        EHLO, MAIL, (b"RCPT TO:<x@anywhere.example>\r\n", ["250 2.1.5"]), DATA, BODY_OK,
    ])
    assert message.hold


def test_intake_refusal_at_mail():
    session, logged = make_session()
    session.services = Services(new_id=lambda: "Q", intake_check=lambda: "disk", log=lambda e, **f: logged.append(e))
    play(session, [EHLO, (b"MAIL FROM:<a@b.example>\r\n", ["452 4.3.1"])])
    assert session.envelope is None


@pytest.mark.parametrize("error, expected", [
    (QueueFullError("disk full"), "452 4.3.1"), (QueueError("locked"), "451 4.3.0"),
])
def test_enqueue_failure_replies_and_session_goes_on(error, expected):
    session, _ = make_session()
    play(session, [EHLO, MAIL, RCPT, DATA])
    [item] = session.feed(b"x\r\n.\r\nNOOP\r\n")
    assert isinstance(item, Enqueue)
    assert session.feed(b"NOOP\r\n") == []  # input waits while the message is being stored
    assert codes(session.enqueue_failed(error)) == [expected, "250 2.0.0", "250 2.0.0"]
    play(session, [(b"DATA\r\n", ["503 5.5.1"]), MAIL])


def test_timeout_and_shutdown_replies():
    session, _ = make_session()
    assert codes(session.timed_out()) == ["421 4.4.2", "close"]
    assert session.state == CLOSED and session.feed(b"NOOP\r\n") == []
    other, _ = make_session()
    assert codes(other.shutting_down()) == ["421 4.3.2", "close"]


def test_log_lines_keyed_by_queue_id():
    session, logged = make_session()
    play(session, [EHLO, MAIL, RCPT, DATA, BODY_OK])
    events = [(event, fields.get("qid")) for event, fields in logged]
    assert ("mail", "Q0001") in events and ("rcpt", "Q0001") in events and ("queued", "Q0001") in events


def test_every_reply_code_matches_its_enhanced_class():
    """RFC 3463 §2: the enhanced code's class digit is the reply's first digit."""
    for name, value in vars(replies).items():
        if isinstance(value, replies.Reply) and value.enhanced:
            assert value.enhanced[0] == str(value.code)[0], name


# -- REQUIRETLS (RFC 8689) -----------------------------------------------------------------------


def ehlo_keywords(session: Session) -> list[str]:
    (reply,) = session.feed(b"EHLO client.example\r\n")
    return [line.split()[0] for line in reply.text.splitlines()[1:]]


def test_requiretls_is_offered_only_over_tls_and_stored_with_the_message():
    plain, _ = make_session(starttls=True)
    assert "REQUIRETLS" not in ehlo_keywords(plain) and "STARTTLS" in ehlo_keywords(plain)
    session, logged = make_session(starttls=True)
    session.tls = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    assert "REQUIRETLS" in ehlo_keywords(session)
    (message,) = play(session, [(b"MAIL FROM:<a@sender.example> REQUIRETLS\r\n", ["250 2.1.0"]), RCPT, DATA,
                                BODY_OK])
    assert message.requiretls
    assert [f for e, f in logged if e == "mail"][0]["requiretls"] is True
    (message,) = play(session, [MAIL, RCPT, DATA, BODY_OK])
    assert not message.requiretls


def test_requiretls_without_tls_is_refused_and_a_value_is_a_syntax_error():
    session, _ = make_session(starttls=True)
    play(session, [EHLO, (b"MAIL FROM:<a@sender.example> REQUIRETLS\r\n", ["530 5.7.10"])])
    session.tls = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    play(session, [(b"MAIL FROM:<a@sender.example> REQUIRETLS=YES\r\n", ["501 5.5.4"]), MAIL])


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_command_line_limits_hold_exactly_at_their_boundaries(ending):
    # RFC 5321 §4.5.3.1.4: 512 octets with the CRLF; MAIL and RCPT, which carry parameters,
    # get MAX_ENVELOPE_COMMAND. One octet more is "500 5.5.2", and the session goes on.
    from elemta.smtp.session import MAX_COMMAND, MAX_ENVELOPE_COMMAND

    session, _ = make_session()
    play(session, [EHLO])
    noop = b"NOOP " + b"a" * (MAX_COMMAND - 5 - len(ending))  # exactly at the limit
    assert codes(session.feed(noop + ending)) == ["250 2.0.0"]
    assert codes(session.feed(b"NOOP a" + noop[5:] + ending)) == ["500 5.5.2"]  # one over
    local = b"a" * (MAX_ENVELOPE_COMMAND - len(b"MAIL FROM:<@b.example>") - len(ending))
    # (a local part this long is refused on its own, 501 5.1.7: what counts is the line's length)
    assert codes(session.feed(b"MAIL FROM:<" + local + b"@b.example>" + ending)) == ["501 5.1.7"]
    assert codes(session.feed(b"MAIL FROM:<a" + local + b"@b.example>" + ending)) == ["500 5.5.2"]
    assert codes(session.feed(b"NOOP\r\n")) == ["250 2.0.0"]
