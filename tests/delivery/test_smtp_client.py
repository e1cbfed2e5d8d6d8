"""delivery/smtp_client.py against real servers on 127.0.0.1: aiosmtpd (SMTP and LMTP) and
small scripted servers for what aiosmtpd cannot do (PIPELINING, DSN, 421, odd replies)."""

from __future__ import annotations

import hashlib
import socket
import ssl

import pytest
from aiosmtpd.controller import UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from elemta.delivery import dane_openssl
from elemta.delivery.dane import DaneCheck, Tlsa
from elemta.delivery.smtp_client import (
    OutMessage,
    OutRecipient,
    Reply,
    SmtpClientError,
    SmtpConnection,
    dot_stuff,
)
from elemta.delivery.smtp_pool import Pool
from elemta.delivery.smtp_reply import ProtocolError, build_reply, parse_line, xtext
from tests.delivery.conftest import Peer
from tests.support import wait_for

BODY = b"Subject: test\r\n\r\nHello\r\n"

# -- aiosmtpd servers ---------------------------------------------------------------------


class Recorder:
    """aiosmtpd handler: records MAIL, RCPT and messages; refuses chosen recipients."""

    def __init__(self, refuse=None, data_replies=None):
        self.refuse = refuse or {}  # address -> RCPT reply
        self.data_replies = data_replies or {}  # address -> LMTP reply after DATA
        self.mails: list[tuple[str, list[str]]] = []
        self.messages: list[dict] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails.append((address, mail_options))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append({
            "sender": envelope.mail_from, "rcpts": list(envelope.rcpt_tos),
            "content": envelope.original_content, "peer": session.peer,
        })
        if isinstance(server, LMTP):  # RFC 2033 §4.2: one reply per accepted recipient
            return "\r\n".join(
                self.data_replies.get(r, f"250 2.0.0 <{r}> delivered") for r in envelope.rcpt_tos
            )
        return "250 2.0.0 queued"


class UnixLmtpController(UnixSocketController):
    def factory(self):
        return LMTP(self.handler, **self.SMTP_kwargs)


def connect(port, **kwargs) -> SmtpConnection:
    kwargs.setdefault("helo_name", "client.test")
    kwargs.setdefault("tls_policy", "none")
    kwargs.setdefault("connect_timeout", 5.0)
    kwargs.setdefault("command_timeout", 10.0)
    return SmtpConnection.open("mx.test", "127.0.0.1", port, **kwargs)


def message(*recipients, **kwargs) -> OutMessage:
    rcpts = tuple(r if isinstance(r, OutRecipient) else OutRecipient(r) for r in recipients)
    kwargs.setdefault("body", BODY)
    return OutMessage(sender=kwargs.pop("sender", "alice@example.org"), recipients=rcpts,
                      **kwargs)


# -- scripted servers -----------------------------------------------------------------------


def esmtp(keywords=("PIPELINING", "8BITMIME"), *, greeting="220 fake.test ESMTP",
          mail="250 2.1.0 ok", rcpt=None, data="354 go ahead", final="250 2.0.0 queued"):
    """A plain ESMTP server; rcpt maps an address to its reply (default 250)."""
    rcpt = rcpt or {}

    def script(peer: Peer) -> None:
        peer.send(greeting)
        accepted = 0
        while True:
            line = peer.line()
            verb = line[:4].upper()
            if verb == "EHLO":
                peer.send(*[f"250-{k}" for k in ("fake.test", *keywords[:-1])],
                          f"250 {keywords[-1]}" if keywords else "250 fake.test")
            elif verb == "MAIL":
                peer.send(mail)
            elif verb == "RCPT":
                address = line.split("<", 1)[1].split(">", 1)[0]
                reply = rcpt.get(address, "250 2.1.5 ok")
                accepted += reply.startswith("2")
                peer.send(reply)
                if reply.startswith("421"):
                    return
            elif verb == "DATA":
                if not accepted:
                    peer.send("554 5.5.1 no valid recipients")
                    continue
                peer.send(data)
                if data.startswith("354"):
                    peer.data()
                    peer.send(final)
                accepted = 0
            elif verb == "RSET":
                accepted = 0
                peer.send("250 2.0.0 ok")
            elif verb == "QUIT":
                peer.send("221 2.0.0 bye")
                return
            else:
                peer.send("502 5.5.1 unknown command")

    return script


# -- replies and helpers --------------------------------------------------------------------


def test_reply_lines_are_parsed_with_and_without_enhanced_codes():
    lines = [parse_line(b"550-5.1.1 first"), parse_line(b"550-5.1.1 second"),
             parse_line(b"550 5.1.1 third")]
    assert build_reply(lines) == Reply(550, "5.1.1", "first second third")
    assert str(build_reply(lines)) == "550 5.1.1 first second third"
    assert build_reply([parse_line(b"550 no such user")]) == Reply(550, "", "no such user")
    assert build_reply([parse_line(b"250")]) == Reply(250, "", "")
    # A status whose class differs from the reply code is text, not a status (RFC 3463).
    assert build_reply([parse_line(b"451 5.1.1 odd")]) == Reply(451, "", "5.1.1 odd")


@pytest.mark.parametrize("raw", [b"HTTP/1.1 400 Bad", b"25O ok", b"250_x", b"",
                                 b"250 " + b"x" * 3000])
def test_garbage_reply_lines_are_protocol_errors(raw):
    with pytest.raises(ProtocolError):
        parse_line(raw)


def test_mixed_codes_in_one_reply_are_a_protocol_error():
    with pytest.raises(ProtocolError):
        build_reply([parse_line(b"250-a"), parse_line(b"550 b")])


def test_dot_stuffing_and_xtext():
    assert dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert dot_stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"


# -- delivery to aiosmtpd -------------------------------------------------------------------


def test_delivers_the_exact_bytes_with_dot_stuffing(aiosmtpd):
    handler = Recorder()
    server = aiosmtpd(handler)
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
    conn = connect(server.port)
    results = conn.send(message("bob@example.org", body=body))
    conn.close()
    assert [r.is_positive for r in results] == [True]
    assert str(results[0].reply) == "250 2.0.0 queued"
    assert handler.messages[0]["content"] == body
    assert handler.messages[0]["rcpts"] == ["bob@example.org"]


def test_one_refused_recipient_gets_its_own_result(aiosmtpd):
    handler = Recorder(refuse={"nobody@example.org": "550 5.1.1 no such user"})
    conn = connect(aiosmtpd(handler).port)
    results = conn.send(message("bob@example.org", "nobody@example.org", "carol@example.org"))
    assert [r.address for r in results] == [
        "bob@example.org", "nobody@example.org", "carol@example.org"]
    assert [r.is_positive for r in results] == [True, False, True]
    assert results[1].is_permanent
    assert results[1].reply == Reply(550, "5.1.1", "no such user")
    assert handler.messages[0]["rcpts"] == ["bob@example.org", "carol@example.org"]
    assert conn.usable()
    conn.close()


def test_size_param_and_8bitmime_are_sent(aiosmtpd):
    handler = Recorder()
    conn = connect(aiosmtpd(handler).port)
    conn.send(message("bob@example.org", body_type="8BITMIME"))
    conn.close()
    assert handler.mails == [("alice@example.org", [f"SIZE={len(BODY)}", "BODY=8BITMIME"])]


def test_too_big_for_the_advertised_size_fails_without_mail(aiosmtpd):
    handler = Recorder()
    conn = connect(aiosmtpd(handler, data_size_limit=100).port)
    results = conn.send(message("bob@example.org", "carol@example.org", body=b"x" * 101))
    assert [(r.reply.code, r.reply.enhanced, r.is_permanent) for r in results] == [
        (552, "5.3.4", True)] * 2
    assert handler.mails == []
    conn.send(message("bob@example.org"))  # the connection is still good
    conn.close()
    assert len(handler.messages) == 1


def test_smtputf8_needed_but_not_offered_is_permanent(aiosmtpd):
    handler = Recorder()
    conn = connect(aiosmtpd(handler, enable_SMTPUTF8=False).port)
    results = conn.send(message("j\u00f6rg@example.org", "bob@example.org"))
    assert [(r.reply.code, r.reply.enhanced) for r in results] == [(553, "5.6.7")] * 2
    assert all(r.is_permanent for r in results)
    results = conn.send(message("bob@example.org", smtputf8=True))
    assert results[0].is_permanent
    assert results[0].reply.enhanced == "5.6.9"  # only the header needs UTF-8
    conn.close()
    assert handler.mails == []


def test_smtputf8_is_used_when_offered(aiosmtpd):
    handler = Recorder()
    conn = connect(aiosmtpd(handler).port)
    results = conn.send(message("j\u00f6rg@example.org"))
    conn.close()
    assert results[0].is_positive
    assert "SMTPUTF8" in handler.mails[0][1]
    assert handler.messages[0]["rcpts"] == ["j\u00f6rg@example.org"]


def test_two_messages_on_one_connection(aiosmtpd):
    handler = Recorder()
    conn = connect(aiosmtpd(handler).port)
    first = conn.send(message("bob@example.org", body=b"one\r\n"))
    second = conn.send(message("carol@example.org", body=b"two\r\n"))
    conn.close()
    assert first[0].is_positive and second[0].is_positive
    assert conn.messages_sent == 2
    assert [m["content"] for m in handler.messages] == [b"one\r\n", b"two\r\n"]
    assert handler.messages[0]["peer"] == handler.messages[1]["peer"]  # one connection


# -- STARTTLS and AUTH ----------------------------------------------------------------------


def test_starttls_may_fills_tls_info_and_asks_ehlo_again(aiosmtpd, server_tls):
    handler = Recorder()
    server = aiosmtpd(handler, tls_context=server_tls)
    conn = connect(server.port, tls_policy="may")
    assert conn.tls is not None
    assert not conn.tls.verified
    assert str(conn.tls).startswith("TLSv1.")
    assert "STARTTLS" not in conn.extensions  # extensions are from the EHLO after TLS
    assert conn.send(message("bob@example.org"))[0].is_positive
    conn.close()


def test_starttls_may_without_offer_goes_on_in_clear(aiosmtpd):
    conn = connect(aiosmtpd(Recorder()).port, tls_policy="may")
    assert conn.tls is None
    assert conn.send(message("bob@example.org"))[0].is_positive
    conn.close()


def test_verify_with_the_right_name(aiosmtpd, server_tls, ca_file):
    server = aiosmtpd(Recorder(), tls_context=server_tls)
    conn = connect(server.port, tls_policy="verify", tls_name="mx.test", ca_file=ca_file)
    assert conn.tls is not None
    assert conn.tls.verified
    conn.close()


def tlsa_of(context_leaf, wrong=False) -> DaneCheck:
    """A DANE check with the 3 1 1 record of a trustme leaf certificate (or of no key at all)."""
    cert = x509.load_pem_x509_certificate(context_leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = b"\0" * 32 if wrong else hashlib.sha256(spki).digest()
    return DaneCheck((Tlsa(3, 1, 1, digest),), "mx.test", ("mx.test",))


@pytest.fixture(scope="module")
def dane_leaf(ca):
    return ca.issue_cert("anything-at-all.test")  # DANE-EE: the names in it do not matter


@pytest.mark.skipif(not dane_openssl.available(), reason="no DANE in this Python's OpenSSL")
def test_dane_makes_tls_mandatory_and_checks_the_tlsa_record_alone(aiosmtpd, dane_leaf, ca_file):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    dane_leaf.configure_cert(context)
    server = aiosmtpd(Recorder(), tls_context=context)
    conn = connect(server.port, tls_policy="may", dane=tlsa_of(dane_leaf))  # "may": DANE overrides it
    assert conn.tls is not None and conn.tls.verified and conn.tls.dane == "3 1 1"
    assert str(conn.tls).endswith("(DANE 3 1 1)")
    assert conn.send(message("bob@example.org"))[0].is_positive
    conn.close()
    with pytest.raises(SmtpClientError) as info:  # the CA would vouch for it, the record does not
        connect(server.port, dane=tlsa_of(dane_leaf, wrong=True), ca_file=ca_file)
    assert (info.value.stage, info.value.enhanced, info.value.try_next_host) == ("starttls", "4.7.5", True)
    assert "no matching DANE TLSA records" in str(info.value)


@pytest.mark.skipif(not dane_openssl.available(), reason="no DANE in this Python's OpenSSL")
def test_dane_without_starttls_is_deferred_never_plain(aiosmtpd, dane_leaf):
    server = aiosmtpd(Recorder())
    with pytest.raises(SmtpClientError) as info:
        connect(server.port, dane=tlsa_of(dane_leaf))
    assert (info.value.stage, info.value.enhanced) == ("tls-policy", "4.7.4")


@pytest.mark.parametrize("name, use_ca", [("other.test", True), ("mx.test", False)])
def test_verify_fails_on_wrong_name_or_unknown_ca(aiosmtpd, server_tls, ca_file, name, use_ca):
    server = aiosmtpd(Recorder(), tls_context=server_tls)
    with pytest.raises(SmtpClientError) as info:
        connect(server.port, tls_policy="verify", tls_name=name,
                ca_file=ca_file if use_ca else None)
    exc = info.value
    assert (exc.stage, exc.enhanced, exc.permanent, exc.try_next_host) == (
        "starttls", "4.7.5", False, True)
    assert "certificate not verified" in str(exc)


def test_encrypt_without_starttls_offered_is_an_error(aiosmtpd):
    with pytest.raises(SmtpClientError) as info:
        connect(aiosmtpd(Recorder()).port, tls_policy="encrypt")
    exc = info.value
    assert (exc.stage, exc.enhanced, exc.permanent, exc.try_next_host) == (
        "tls-policy", "4.7.4", False, True)


def authenticator(seen, password="secret"):
    def check(server, session, envelope, mechanism, auth_data):
        seen.append((mechanism, auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == password.encode(), handled=False)
    return check


@pytest.mark.parametrize("exclude, mechanism", [((), "PLAIN"), (("PLAIN",), "LOGIN")])
def test_auth_over_tls(aiosmtpd, server_tls, exclude, mechanism):
    seen = []
    server = aiosmtpd(Recorder(), tls_context=server_tls, authenticator=authenticator(seen),
                      auth_require_tls=True, auth_exclude_mechanism=exclude)
    conn = connect(server.port, tls_policy="encrypt", auth=("user", "secret"))
    assert conn.send(message("bob@example.org"))[0].is_positive
    conn.close()
    assert seen == [(mechanism, b"user", b"secret")]


def test_auth_refused_is_transient(aiosmtpd, server_tls):
    seen = []
    server = aiosmtpd(Recorder(), tls_context=server_tls, authenticator=authenticator(seen))
    with pytest.raises(SmtpClientError) as info:
        connect(server.port, tls_policy="may", auth=("user", "wrong"))
    exc = info.value
    assert exc.stage == "auth"
    assert exc.reply is not None and exc.reply.code == 535
    assert not exc.permanent
    assert exc.enhanced.startswith("4.")


def test_no_password_without_tls(aiosmtpd):
    seen = []
    server = aiosmtpd(Recorder(), authenticator=authenticator(seen), auth_require_tls=False)
    with pytest.raises(SmtpClientError) as info:
        connect(server.port, tls_policy="none", auth=("user", "secret"))
    assert (info.value.stage, info.value.enhanced) == ("auth", "4.7.10")
    assert seen == []


# -- LMTP -----------------------------------------------------------------------------------


def test_lmtp_gives_one_reply_per_recipient(aiosmtpd):
    handler = Recorder(data_replies={"carol@example.org": "552 5.2.2 mailbox full"},
                       refuse={"nobody@example.org": "550 5.1.1 no such user"})
    conn = connect(aiosmtpd(handler, lmtp=True).port, lmtp=True)
    results = conn.send(message("bob@example.org", "nobody@example.org", "carol@example.org"))
    conn.close()
    assert [str(r.reply) for r in results] == [
        "250 2.0.0 <bob@example.org> delivered",
        "550 5.1.1 no such user",
        "552 5.2.2 mailbox full",
    ]
    assert [r.is_positive for r in results] == [True, False, False]


def test_lmtp_over_a_unix_socket(tmp_path):
    handler = Recorder()
    path = tmp_path / "lmtp.sock"
    controller = UnixLmtpController(handler, unix_socket=path)
    controller.start()
    try:
        conn = SmtpConnection.open("localhost", "", 0, helo_name="client.test", lmtp=True,
                               unix_path=str(path), command_timeout=10.0)
        results = conn.send(message("bob@example.org"))
        conn.close()
    finally:
        controller.stop()
    assert results[0].is_positive
    assert handler.messages[0]["content"] == BODY


def lmtp_gone_after_one_reply(peer):
    """An LMTP server that takes two recipients and is gone after the first one's reply."""
    peer.send("220 lmtp.test LMTP")
    assert peer.line().startswith("LHLO")
    peer.send("250-lmtp.test", "250 PIPELINING")
    for _ in range(4):  # MAIL, 2 RCPT, DATA
        peer.line()
    peer.send("250 ok", "250 ok", "250 ok", "354 go")
    peer.data()
    peer.send("250 2.0.0 bob delivered")  # then gone, before carol's reply


def test_lmtp_connection_lost_after_some_replies_keeps_those(scripted):
    server = scripted(lmtp_gone_after_one_reply)
    conn = connect(server.port, lmtp=True)
    results = conn.send(message("bob@example.org", "carol@example.org"))
    assert results[0].is_positive
    assert results[1].is_transient
    assert not conn.usable()


# -- scripted: PIPELINING, DSN, replies, errors ---------------------------------------------


def test_pipelining_sends_mail_rcpt_and_data_in_one_go(scripted):
    def script(peer):
        peer.send("220 fake.test ESMTP")
        peer.line()
        peer.send("250-fake.test", "250 PIPELINING")
        # Nothing is answered before all four commands are in: a lock-step client would
        # wait for the MAIL reply and this read would time out.
        commands = [peer.line() for _ in range(4)]
        assert [c[:4] for c in commands] == ["MAIL", "RCPT", "RCPT", "DATA"]
        peer.send("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 unknown", "354 go")
        peer.data()
        peer.send("250 2.0.0 queued")
        assert peer.line() == "QUIT"
        peer.send("221 bye")

    server = scripted(script)
    conn = connect(server.port)
    results = conn.send(message("bob@example.org", "nobody@example.org"))
    conn.close()
    assert [str(r.reply) for r in results] == ["250 2.0.0 queued", "550 5.1.1 unknown"]
    assert server.errors == []
    assert server.messages == [BODY]


def test_pipelining_with_no_recipient_accepted(scripted):
    server = scripted(esmtp(rcpt={"bob@example.org": "450 4.2.1 try later"}))
    conn = connect(server.port)
    results = conn.send(message("bob@example.org"))
    assert results[0].is_transient
    assert results[0].reply == Reply(450, "4.2.1", "try later")
    assert server.received[-1] == "RSET"  # after the DATA that got 554
    assert conn.send(message("carol@example.org"))[0].is_positive
    conn.close()


DSN_MESSAGE = message(
    OutRecipient("bob@example.org", ("SUCCESS", "FAILURE"), "rfc822;bob+tag@example.org"),
    OutRecipient("carol@example.org", ("FAILURE",)),
    envid="id+1=x", ret="HDRS",
)


def test_dsn_parameters_when_offered(scripted):
    server = scripted(esmtp(("DSN", "SIZE 1000000", "PIPELINING")))
    conn = connect(server.port)
    results = conn.send(DSN_MESSAGE)
    conn.close()
    assert server.received[1:4] == [
        f"MAIL FROM:<alice@example.org> SIZE={len(BODY)} RET=HDRS ENVID=id+2B1+3Dx",
        "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Btag@example.org",
        "RCPT TO:<carol@example.org> NOTIFY=FAILURE",
    ]
    assert [r.relayed for r in results] == [False, False]


def test_no_dsn_parameters_and_relayed_when_not_offered(scripted):
    server = scripted(esmtp(("PIPELINING",)))
    conn = connect(server.port)
    results = conn.send(DSN_MESSAGE)
    conn.close()
    assert server.received[1:4] == [
        "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.org>",
        "RCPT TO:<carol@example.org>"]
    assert [r.relayed for r in results] == [True, False]  # only bob asked for SUCCESS


def test_multi_line_greeting_and_replies(scripted):
    server = scripted(esmtp(
        (), greeting="220-fake.test\r\n220-second line\r\n220 ready",
        rcpt={"bob@example.org": "550-5.1.1 first\r\n550-5.1.1 second\r\n550 5.1.1 third"}))
    conn = connect(server.port)
    results = conn.send(message("bob@example.org", "carol@example.org"))
    conn.close()
    assert results[0].reply == Reply(550, "5.1.1", "first second third")
    assert results[1].is_positive


def test_helo_fallback_when_ehlo_is_refused(scripted):
    def script(peer):
        peer.send("220 old.test SMTP")
        assert peer.line().startswith("EHLO")
        peer.send("502 5.5.1 what?")
        assert peer.line() == "HELO client.test"
        peer.send("250 old.test")
        assert peer.line() == "QUIT"
        peer.send("221 bye")

    server = scripted(script)
    conn = connect(server.port)
    assert conn.extensions == {}
    conn.close()
    assert server.errors == []


def test_mail_refused_permanently_applies_to_every_recipient(scripted):
    server = scripted(esmtp((), mail="553 5.7.1 sender rejected"))
    conn = connect(server.port)
    results = conn.send(message("bob@example.org", "carol@example.org"))
    assert [str(r.reply) for r in results] == ["553 5.7.1 sender rejected"] * 2
    assert "RCPT TO:<bob@example.org>" not in server.received  # lock-step: no RCPT
    assert conn.usable()
    conn.close()


def test_mail_refused_temporarily_raises(scripted):
    server = scripted(esmtp(("PIPELINING",), mail="451 4.3.0 busy"))
    conn = connect(server.port)
    with pytest.raises(SmtpClientError) as info:
        conn.send(message("bob@example.org"))
    exc = info.value
    assert (exc.stage, exc.permanent, exc.try_next_host, exc.enhanced) == (
        "mail", False, True, "4.3.0")
    assert "451 4.3.0 busy" in str(exc)
    assert not conn.usable()


def test_421_during_rcpt_closes_and_raises(scripted):
    server = scripted(esmtp((), rcpt={"carol@example.org": "421 4.3.2 shutting down"}))
    conn = connect(server.port)
    with pytest.raises(SmtpClientError) as info:
        conn.send(message("bob@example.org", "carol@example.org"))
    exc = info.value
    assert (exc.stage, exc.permanent, exc.try_next_host) == ("rcpt", False, True)
    assert exc.reply == Reply(421, "4.3.2", "shutting down")
    assert not conn.usable()
    conn.close()  # harmless on a closed connection


def test_greeting_554_means_next_host(scripted):
    server = scripted(esmtp((), greeting="554 5.7.1 go away"))
    with pytest.raises(SmtpClientError) as info:
        connect(server.port)
    exc = info.value
    assert (exc.stage, exc.try_next_host, exc.permanent) == ("greeting", True, True)
    assert "go away" in str(exc) and "mx.test[127.0.0.1]" in str(exc)
    assert server.received == ["QUIT"]  # RFC 5321 §3.1: QUIT after a 554 greeting


@pytest.mark.parametrize("greeting", [b"HTTP/1.1 400 Bad Request\r\n", b"220 " + b"x" * 5000],
                         ids=["http", "endless-line"])
def test_garbage_is_a_transient_protocol_error(scripted, greeting):
    def script(peer):
        peer.wfile.write(greeting)
        peer.server.release.wait(10)

    server = scripted(script)
    with pytest.raises(SmtpClientError) as info:
        connect(server.port)
    exc = info.value
    assert (exc.stage, exc.enhanced, exc.permanent, exc.try_next_host) == (
        "greeting", "4.5.0", False, True)


def test_silent_server_times_out(scripted):
    server = scripted(lambda peer: peer.server.release.wait(10))
    with pytest.raises(SmtpClientError) as info:
        connect(server.port, command_timeout=0.2)
    assert (info.value.stage, info.value.try_next_host) == ("greeting", True)
    assert "timed out" in str(info.value)


def test_dripping_reply_times_out_at_its_deadline(scripted):
    """One deadline for the whole reply: a byte every 50 ms keeps each recv() short, but
    the reply never ends, and the client gives up instead of reading until the peer stops."""
    def script(peer):
        peer.wfile.write(b"220 ")
        while not peer.server.release.wait(0.05):
            peer.wfile.write(b"x")

    server = scripted(script)
    with pytest.raises(SmtpClientError) as info:
        connect(server.port, command_timeout=0.3)
    assert (info.value.stage, info.value.try_next_host) == ("greeting", True)
    assert "timed out" in str(info.value)


def test_silent_server_after_starttls_times_out(scripted, server_tls):
    """The kernel's receive timeout also ends a wait inside TLS (SSLWantReadError)."""
    def script(peer):
        peer.send("220 fake.test ESMTP")
        peer.line()
        peer.send("250-fake.test", "250 STARTTLS")
        assert peer.line() == "STARTTLS"
        peer.send("220 2.0.0 go ahead")
        tls = server_tls.wrap_socket(peer.connection, server_side=True)
        tls.recv(4096)  # the EHLO after TLS, never answered
        peer.server.release.wait(10)

    server = scripted(script)
    with pytest.raises(SmtpClientError) as info:
        connect(server.port, tls_policy="may", command_timeout=0.3)
    assert server.errors == []
    assert (info.value.stage, info.value.try_next_host) == ("ehlo", True)
    assert "timed out" in str(info.value)


def stops_reading_after_354(peer):
    """A server that says 354 and then reads nothing more."""
    peer.send("220 fake.test ESMTP")
    peer.line()
    peer.send("250-fake.test", "250 PIPELINING")
    for reply in ("250 2.1.0 ok", "250 2.1.5 ok", "354 go ahead"):
        peer.line()
        peer.send(reply)
    peer.server.release.wait(10)


BIG = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 32_000  # more than the socket buffers hold


def test_peer_that_stops_reading_times_out_the_send(scripted):
    """SO_SNDTIMEO: a body the peer does not take ends in a timeout, not a hang."""
    server = scripted(stops_reading_after_354)
    conn = connect(server.port, command_timeout=0.3)
    body = BIG
    with pytest.raises(SmtpClientError) as info:
        conn.send(message("bob@example.org", body=body))
    assert (info.value.stage, info.value.try_next_host) == ("data", True)
    assert "timed out" in str(info.value)


def test_connection_refused_means_next_host():
    with socket.socket() as closed:  # bound, not listening: connecting is refused
        closed.bind(("127.0.0.1", 0))
        with pytest.raises(SmtpClientError) as info:
            connect(closed.getsockname()[1])
    exc = info.value
    assert (exc.stage, exc.try_next_host, exc.permanent, exc.enhanced) == (
        "connect", True, False, "4.4.1")


# -- Pool -----------------------------------------------------------------------------------


class FakeConn:
    def __init__(self, messages_sent=1):
        self.messages_sent = messages_sent
        self.closed = False

    def usable(self, probe=True):
        return not self.closed

    def close(self):
        self.closed = True


def test_pool_reuses_a_real_connection(aiosmtpd):
    handler = Recorder()
    server = aiosmtpd(handler)
    pool = Pool()
    key = ("mx.test", server.port, "none", False)
    assert pool.get(key) is None
    conn = connect(server.port)
    conn.send(message("bob@example.org"))
    pool.put(key, conn)
    again = pool.get(key)
    assert again is conn
    again.send(message("carol@example.org"))
    pool.put(key, again)
    assert pool.stats()["reused"] == 1
    assert pool.stats()["idle"] == 1
    pool.close_all()
    assert not conn.usable()
    assert handler.messages[0]["peer"] == handler.messages[1]["peer"]


def test_pool_idle_expiry_with_a_fake_clock():
    now = [100.0]
    pool = Pool(idle_timeout=10, clock=lambda: now[0])
    old, new = FakeConn(), FakeConn()
    pool.put("a", old)
    now[0] += 6
    pool.put("b", new)
    now[0] += 5  # "a" idle for 11 s, "b" for 5 s
    assert pool.close_idle() == 1
    assert old.closed and not new.closed
    assert pool.get("a") is None
    now[0] += 6
    assert pool.get("b") is None  # expired on get: not handed out, and closed at the next sweep
    assert not new.closed and pool.stats()["idle"] == 0
    assert pool.close_idle() == 1 and new.closed


def test_pool_closes_at_max_messages_max_idle_or_unusable():
    pool = Pool(max_messages=3, max_idle=2)
    spent, broken, kept, extra, over = (FakeConn(3), FakeConn(), FakeConn(), FakeConn(),
                                        FakeConn())
    broken.closed = True
    pool.put("k", spent)
    pool.put("k", broken)
    assert spent.closed
    pool.put("k", kept)
    pool.put("j", extra)
    pool.put("j", over)  # the pool holds max_idle already
    assert over.closed and not kept.closed and not extra.closed
    assert pool.get("k") is kept


def test_pool_drops_a_connection_the_server_closed(scripted):
    def script(peer):
        peer.send("220 fake.test ESMTP")
        peer.line()
        peer.send("250 fake.test")
        peer.send("421 4.4.2 idle timeout")  # and the handler ends: the server closes

    server = scripted(script)
    pool = Pool()
    conn = connect(server.port)
    pool.put("k", conn)  # kept, or closed already if the 421 was quick
    # The 421 reaches the client socket asynchronously; usable() must notice it.
    wait_for(lambda: not conn.usable(), timeout=10, what="the 421 to arrive")
    assert pool.get("k") is None
    pool.close_idle()  # what get() found broken is closed here, off the delivery loop
    stats = pool.stats()
    assert (stats["reused"], stats["closed"], stats["idle"]) == (0, 1, 0)
