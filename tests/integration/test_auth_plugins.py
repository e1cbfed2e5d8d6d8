"""The built-in plugins in the real daemon, against a real DNS server on loopback: SPF,
DKIM signing (keys made by `elemtactl dkim keygen`) and verifying, DMARC, greylisting.

Clients from 127.0.0.2 are in smtp.trusted_networks, so their mail is ours and gets signed;
clients from 127.0.0.1 are strangers and get checked.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess

import dkim
import pytest

from tests.dnsserver import DnsServer
from tests.plugins.builtin.test_dkim import dkimpy_dns
from tests.support import ROOT, Daemon, wait_for

ELEMTACTL = ROOT / "bin" / "elemtactl"

RECORDS = {
    "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", 300)],
    "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject", 300)],
    "fail.test": [("TXT", "v=spf1 -all", 300)],
    "soft.test": [("TXT", "v=spf1 ~all", 300)],
    "temp.test": [("TXT", "v=spf1 -all", 300)],
    "bounces.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", 300)],
    "strict.test": [("TXT", "v=spf1 ip4:192.0.2.1 ?all", 300)],
    "_dmarc.strict.test": [("TXT", "v=DMARC1; p=reject", 300)],
    "_dmarc.lax.test": [("TXT", "v=DMARC1; p=quarantine", 300)],
}

CONFIG = """
[server]
spool_dir = "@SPOOL@"
hostname = "mx.test"
[smtp]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.2/32"]
relay_domains = ["example.test", "elsewhere.test"]
[delivery]
hold = true
resolvers = ["@DNS@"]
[limits]
ip_connections_per_minute = 0
[[listeners]]
address = "127.0.0.1:0"
role = "mx"
"""

AUTH = """
[[plugins]]
use = "spf"
[[plugins]]
use = "dkim"
[plugins.options]
keys = [{domain = "sender.test", selector = "rsa1", key_file = "@KEYS@/sender.test.rsa1.key"},
        {domain = "sender.test", selector = "ed1", key_file = "@KEYS@/sender.test.ed1.key"}]
[[plugins]]
use = "dmarc"
"""

GREYLIST = """
[[plugins]]
use = "greylist"
[plugins.options]
delay = 1
"""


def message(sender_domain="sender.test", body="Lunch at noon?"):
    return (f"From: Alice <alice@{sender_domain}>\r\nTo: bob@example.test\r\nSubject: lunch\r\n"
            f"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@{sender_domain}>\r\n\r\n{body}\r\n").encode()


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(RECORDS) as server:
        server.fail("temp.test", "servfail")
        yield server


@pytest.fixture(scope="module")
def keys(dns_server, tmp_path_factory):
    """Keys made the way an admin makes them, their records published on the DNS server."""
    directory = tmp_path_factory.mktemp("dkim")
    for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
        out = subprocess.run([str(ELEMTACTL), "dkim", "keygen", "sender.test", selector, "--algorithm", algorithm,
                              "--key-dir", str(directory)], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        name, strings = re.fullmatch(r'(\S+)\. IN TXT \( (.*) \)\n', out.stdout).groups()
        assert name == f"{selector}._domainkey.sender.test"
        dns_server.add(name, "TXT", re.findall(r'"([^"]*)"', strings))
    return directory


def start(tmp_path, dns_server, plugins: str, keys=None) -> Daemon:
    text = (CONFIG + plugins).replace("@DNS@", dns_server.nameserver).replace("@KEYS@", str(keys or ""))
    return Daemon(tmp_path, text).start()


@pytest.fixture(scope="module")
def daemon(dns_server, keys, tmp_path_factory):
    d = start(tmp_path_factory.mktemp("auth"), dns_server, AUTH, keys)
    yield d
    d.stop()


def send(daemon, raw, mail_from="alice@sender.test", source="127.0.0.1", rcpt="bob@example.test"):
    with smtplib.SMTP("127.0.0.1", daemon.ports["mx"], timeout=10, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        client.sendmail(mail_from, [rcpt], raw)


def queued(daemon, count):
    rows = wait_for(lambda: (r := daemon.messages()) and len(r) >= count and r, what=f"{count} queued")
    return rows[count - 1]


def header(body: bytes) -> str:
    return body.split(b"\r\n\r\n")[0].decode()


def auth_results(body: bytes) -> str:
    match = re.search(r"^Authentication-Results: (.*?)\r\n(?! )(?!\t)", header(body) + "\r\n", re.MULTILINE | re.DOTALL)
    return match.group(1).replace("\r\n\t", " ") if match else ""


def test_spf_pass_is_recorded_in_received_spf_and_authentication_results(daemon):
    before = len(daemon.messages())
    send(daemon, message())
    body = daemon.body(queued(daemon, before + 1)["queue_id"])
    results = auth_results(body)
    assert results.startswith("mx.test; spf=pass smtp.mailfrom=alice@sender.test")
    assert "dkim=none" in results and "dmarc=pass" in results  # aligned SPF
    assert re.search(r"^Received-SPF: pass ", header(body), re.MULTILINE)
    # One grep of the queue ID finds the plugins' lines too (elemta(8), LOGGING).
    qid = queued(daemon, before + 1)["queue_id"]
    lines = wait_for(lambda: [x for x in daemon.log_text().splitlines() if " checked " in x and "plugin=dmarc" in x
                              and "result=pass" in x and f" {qid} " in x], what="dmarc's line with the queue ID")
    assert lines and not any(" NOQUEUE checked " in x and "plugin=dmarc" in x for x in daemon.log_text().splitlines())


def test_spf_fail_is_refused_at_mail_from(daemon):
    with pytest.raises(smtplib.SMTPSenderRefused) as caught:
        send(daemon, message("fail.test"), mail_from="alice@fail.test")
    assert (caught.value.smtp_code, caught.value.smtp_error[:10]) == (550, b"5.7.23 SPF")


def test_spf_softfail_is_tagged(daemon):
    before = len(daemon.messages())
    send(daemon, message("soft.test"), mail_from="alice@soft.test")
    body = daemon.body(queued(daemon, before + 1)["queue_id"])
    assert "spf=softfail smtp.mailfrom=alice@soft.test" in auth_results(body)
    assert re.search(r"^Received-SPF: softfail ", header(body), re.MULTILINE)


def test_spf_temperror_is_451(daemon):
    with pytest.raises(smtplib.SMTPSenderRefused) as caught:
        send(daemon, message("temp.test"), mail_from="alice@temp.test")
    assert (caught.value.smtp_code, caught.value.smtp_error[:5]) == (451, b"4.4.3")


def test_dmarc_reject_without_aligned_identifiers_is_550_5_7_1(daemon):
    # SPF passes for the bounce domain, but nothing aligns with From: strict.test (p=reject).
    with pytest.raises(smtplib.SMTPDataError) as caught:
        send(daemon, message("strict.test"), mail_from="bounce@bounces.test")
    assert caught.value.smtp_code == 550
    assert caught.value.smtp_error == b"5.7.1 DMARC policy of strict.test rejects this message"


def test_dmarc_quarantine_holds_the_message(daemon):
    before = len(daemon.messages())
    send(daemon, message("lax.test"), mail_from="bounce@bounces.test")
    row = queued(daemon, before + 1)
    assert [r["state"] for r in daemon.recipients(row["queue_id"])] == ["held"]
    assert "dmarc=fail" in auth_results(daemon.body(row["queue_id"]))


def test_our_mail_is_signed_rsa_and_ed25519_and_verifies(daemon, dns_server):
    before = len(daemon.messages())
    send(daemon, message(), source="127.0.0.2", rcpt="carol@elsewhere.test")
    body = daemon.body(queued(daemon, before + 1)["queue_id"])
    assert "Authentication-Results" not in header(body)  # ours: signed, not checked
    signed = dkim.DKIM(body)
    algorithms = [dict(dkim.util.parse_tag_value(re.sub(rb"\s+", b"", v)))[b"a"]
                  for n, v in signed.headers if n.lower() == b"dkim-signature"]
    assert sorted(algorithms) == [b"ed25519-sha256", b"rsa-sha256"]
    assert [signed.verify(i, dnsfunc=dkimpy_dns(dns_server)) for i in range(2)] == [True, True]
    tampered = body.replace(b"Lunch at noon?", b"Lunch at one?")
    assert [verifies(tampered, i, dns_server) for i in range(2)] == [False, False]


def verifies(raw: bytes, index: int, dns_server) -> bool:
    try:
        return dkim.DKIM(raw).verify(index, dnsfunc=dkimpy_dns(dns_server))
    except dkim.DKIMException:
        return False


def test_a_signed_message_verifies_on_arrival_and_a_tampered_one_fails(daemon, dns_server):
    before = len(daemon.messages())
    send(daemon, message(), source="127.0.0.2", rcpt="carol@elsewhere.test")
    signed = daemon.body(queued(daemon, before + 1)["queue_id"])
    original = signed[signed.index(b"\r\nDKIM-Signature") + 2:]  # as it left us, without our Received
    send(daemon, original, mail_from="bounce@bounces.test")
    results = auth_results(daemon.body(queued(daemon, before + 2)["queue_id"]))
    assert results.count("dkim=pass header.d=sender.test") == 2
    assert "dmarc=pass" in results  # aligned DKIM, though SPF is for bounces.test
    with pytest.raises(smtplib.SMTPDataError) as caught:  # DMARC p=reject once DKIM fails
        send(daemon, original.replace(b"Lunch at noon?", b"Lunch at one?"), mail_from="bounce@bounces.test")
    assert caught.value.smtp_code == 550


def test_elemtactl_plugins_counts_the_calls(daemon):
    def counts():
        out = subprocess.run([str(ELEMTACTL), "--config", str(daemon.config_path), "plugins", "--json"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        plugins = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
        spf = plugins.get("spf", {}).get("hooks", {}).get("on_mail_from", {}).get("verdicts", {})
        # Each worker publishes its own counts: the reject and the defer may have been counted
        # by different workers, seen here one publication apart.
        return plugins if spf.get("reject") and spf.get("defer") else None
    plugins = wait_for(counts, timeout=20, what="statistics with the SPF reject and defer")
    assert set(plugins) == {"spf", "dkim", "dmarc"}
    assert plugins["spf"]["hooks"]["on_mail_from"]["verdicts"]["defer"] >= 1
    assert plugins["dmarc"]["hooks"]["on_message"]["verdicts"].get("reject", 0) >= 1


def test_greylisting_first_450_then_250_after_the_delay(tmp_path, dns_server):
    daemon = start(tmp_path, dns_server, GREYLIST)
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            send(daemon, message())
        assert caught.value.recipients["bob@example.test"][0] == 450
        assert caught.value.recipients["bob@example.test"][1].startswith(b"4.7.1 Greylisted")

        def retry() -> bool:  # a sender's retries, until the delay has passed
            try:
                send(daemon, message())
            except smtplib.SMTPRecipientsRefused:
                return False
            return True
        wait_for(retry, timeout=10, interval=0.2, what="the retry to pass")
        body = daemon.body(queued(daemon, 1)["queue_id"])
        assert "X-Greylist: passed after" in header(body)
        send(daemon, message())  # the network is whitelisted now: at once
        queued(daemon, 2)
    finally:
        daemon.stop()


def test_one_grep_of_the_queue_id_finds_a_message_s_whole_life(tmp_path, dns_server, keys):
    """issue 17: from MAIL to delivery, the plugins' verdicts included, every line of a message
    carries its queue ID, so `grep QUEUE-ID` is its whole story."""
    from tests.mx import Mx

    with Mx() as mx:
        text = (CONFIG + AUTH).replace("hold = true", f'relayhost = "127.0.0.1:{mx.port}"\n'
                                                       'relayhost_tls_policy = "none"')
        d = Daemon(tmp_path, text.replace("@DNS@", dns_server.nameserver).replace("@KEYS@", str(keys)))
        d.start()
        try:
            send(d, message(), rcpt="bob@elsewhere.test")
            qid = queued(d, 1)["queue_id"]
            wait_for(lambda: f"{qid} delivered " in d.log_text(), 20, what="the delivery")
            story = [line.split(": ", 1)[1].split()[1] for line in d.log_text().splitlines()
                     if f" {qid} " in line]
        finally:
            d.stop()
    for event in ("mail", "rcpt", "queued", "delivered"):
        assert event in story, story
    checked = [line for line in d.log_text().splitlines() if " checked " in line]
    assert {re.search(r"plugin=(\w+)", line).group(1) for line in checked if f" {qid} " in line} >= {"spf", "dmarc"}
    assert not [line for line in checked if " NOQUEUE checked " in line]
