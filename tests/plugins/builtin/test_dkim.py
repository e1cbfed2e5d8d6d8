"""The dkim plugin and its key generation, against a loopback DNS server and dkimpy's own verifier."""

from __future__ import annotations

import base64
import os
import re
import stat

import dkim
import dns.message
import dns.query
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from elemta.dnscache import Resolver
from elemta.plugins import api
from elemta.plugins.builtin import dkim_keys
from elemta.plugins.builtin.dkim import DkimPlugin
from tests.dnsserver import DnsServer

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Lunch\r\n"
    b"Date: Mon, 2 Mar 2026 12:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Shall we meet at noon?\r\n"
    b"-- \r\n"
    b"Alice\r\n"
)


@pytest.fixture()
def server():
    with DnsServer({}) as s:
        yield s


@pytest.fixture()
def logged():
    return []


@pytest.fixture()
def services(tmp_path, server, logged):
    return api.Services(hostname="mx.test", spool_dir=str(tmp_path), dns=Resolver([server.nameserver], timeout=2),
                        authserv_id="mx.test", log=lambda event, **fields: logged.append((event, fields)))


class Keys:
    """Makes key pairs with dkim_keys, writes the private half, publishes the public half."""

    def __init__(self, tmp_path, server):
        self.tmp_path, self.server = tmp_path, server

    def make(self, domain="example.com", selector="s1", algorithm="rsa", bits=1024, publish=True) -> dict:
        private, public = dkim_keys.generate(algorithm, bits)
        path = self.tmp_path / f"{domain}.{selector}.key"
        dkim_keys.write_key(path, private)
        if publish:
            self.server.add(f"{selector}._domainkey.{domain}", "TXT", dkim_keys.record_strings(algorithm, public))
        return {"domain": domain, "selector": selector, "key_file": str(path)}


@pytest.fixture()
def keys(tmp_path, server):
    return Keys(tmp_path, server)


def plugin(services, **options) -> DkimPlugin:
    p = DkimPlugin("dkim")
    p.configure(dict(DkimPlugin.options, **options))
    p.start(services)
    return p


def context(raw: bytes, outbound: bool, sender: str = "alice@example.com") -> api.Context:
    connection = api.Connection(ip="192.0.2.10", role="submission" if outbound else "mx",
                                user="alice" if outbound else None)
    transaction = api.Transaction(queue_id="Q1", sender=sender, recipients=["bob@example.org"])
    return api.Context("on_message", connection=connection, transaction=transaction, message=api.Message(raw))


def sign(p: DkimPlugin, raw: bytes = MESSAGE, sender: str = "alice@example.com") -> bytes:
    """The message as it leaves: the plugin's headers on top, as the core writes them."""
    verdict = p.on_message(context(raw, outbound=True, sender=sender))
    assert verdict is not None and verdict.action == "continue"
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in verdict.add_headers) + raw


def tamper(raw: bytes) -> bytes:
    return raw.replace(b"noon", b"one")


def dkimpy_dns(server: DnsServer):
    """dkimpy's dnsfunc reading the loopback server directly (not through elemta's resolver)."""
    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        reply = dns.query.udp(dns.message.make_query(name.decode(), "TXT"), server.address[0],
                              port=server.address[1], timeout=2)
        for rrset in reply.answer:
            for rd in rrset:
                return b"".join(rd.strings)
        return None
    return txt


def tag(raw: bytes, idx: int, name: str) -> str:
    values = [v for n, v in dkim.DKIM(raw).headers if n.lower() == b"dkim-signature"]
    return dict(dkim.util.parse_tag_value(re.sub(rb"\s+", b"", values[idx])))[name.encode()].decode()


# -- signing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_verifies_with_dkimpy(services, keys, server, algorithm):
    p = plugin(services, keys=[keys.make(algorithm=algorithm)])
    signed = sign(p)
    assert signed.startswith(b"DKIM-Signature: v=1; a=" + (b"rsa" if algorithm == "rsa" else b"ed25519") + b"-sha256;")
    assert b"\r\n " in signed.split(b"\r\n\r\n")[0]  # dkimpy's folding kept
    assert tag(signed, 0, "c") == "relaxed/relaxed"
    assert (tag(signed, 0, "d"), tag(signed, 0, "s")) == ("example.com", "s1")
    assert tag(signed, 0, "h").split(":") == ["from", "to", "subject", "date", "message-id", "from"]
    assert dkim.verify(signed, dnsfunc=dkimpy_dns(server)) is True
    assert dkim.verify(tamper(signed), dnsfunc=dkimpy_dns(server)) is False
    # From is oversigned (RFC 6376 §8.15): a second From added on top breaks the signature.
    assert dkim.verify(b"From: mallory@example.net\r\n" + signed, dnsfunc=dkimpy_dns(server)) is False


def test_several_keys_for_one_domain_give_several_signatures(services, keys, server):
    p = plugin(services, keys=[keys.make(selector="2026a"), keys.make(selector="2026b"),
                               keys.make(selector="ed", algorithm="ed25519")])
    signed = sign(p)
    assert signed.count(b"DKIM-Signature:") == 3
    assert [tag(signed, i, "s") for i in range(3)] == ["2026a", "2026b", "ed"]
    message = dkim.DKIM(signed)
    assert [message.verify(i, dnsfunc=dkimpy_dns(server)) for i in range(3)] == [True, True, True]


def test_signing_domain_is_the_from_domain_or_its_parent_else_the_sender(services, keys):
    p = plugin(services, keys=[keys.make(domain="example.com"), keys.make(domain="example.net")])
    sub = MESSAGE.replace(b"alice@example.com", b"alice@lists.example.com")
    assert tag(sign(p, sub, sender="bounce@example.net"), 0, "d") == "example.com"
    other = MESSAGE.replace(b"alice@example.com", b"alice@example.org")
    assert tag(sign(p, other, sender="alice@example.net"), 0, "d") == "example.net"
    assert p.on_message(context(other, outbound=True, sender="alice@example.org")) is None


def test_inbound_mail_is_not_signed_and_outbound_not_verified(services, keys):
    p = plugin(services, keys=[keys.make()])
    verdict = p.on_message(context(MESSAGE, outbound=False))
    assert verdict.add_headers == () and verdict.auth_results == ("dkim=none",)
    assert plugin(services, keys=[keys.make(selector="s2")], sign=False).on_message(context(MESSAGE, True)) is None
    assert plugin(services, verify=False).on_message(context(MESSAGE, False)) is None


# -- verifying -------------------------------------------------------------------------------


def verify(p: DkimPlugin, raw: bytes) -> tuple[api.Verdict, list]:
    ctx = context(raw, outbound=False)
    verdict = p.on_message(ctx)
    return verdict, ctx.transaction.notes["dkim"]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_verify_pass_and_fail(services, keys, algorithm):
    p = plugin(services, keys=[keys.make(algorithm=algorithm)])
    signed = sign(p)
    b = tag(signed, 0, "b")[:8]
    verdict, notes = verify(p, signed)
    quoted = b if re.fullmatch(r"[A-Za-z0-9+]+", b) else f'"{b}"'
    assert verdict.auth_results == (f"dkim=pass header.d=example.com header.s=s1 header.b={quoted}",)
    assert notes == [{"domain": "example.com", "selector": "s1", "result": "pass"}]
    verdict, notes = verify(p, tamper(signed))
    assert verdict.action == "continue"
    assert verdict.auth_results[0].startswith("dkim=fail (body hash did not verify) header.d=example.com header.s=s1")
    assert notes[0]["result"] == "fail"
    verdict, _ = verify(p, signed.replace(b"Subject: Lunch", b"Subject: Dinner"))
    assert verdict.auth_results[0].startswith("dkim=fail (signature did not verify) header.d=example.com")


def test_key_problems_are_permerror_and_dns_failure_temperror(services, keys, server):
    p = plugin(services, max_signatures=10, keys=[keys.make(), keys.make(selector="gone", publish=False),
                               keys.make(selector="revoked", publish=False), keys.make(selector="flaky"),
                               keys.make(selector="broken", publish=False)])
    server.add("revoked._domainkey.example.com", "TXT", "v=DKIM1; k=rsa; p=")
    server.add("broken._domainkey.example.com", "TXT", "v=DKIM1; k=rsa; p=AAAA")
    server.fail("flaky._domainkey.example.com", "servfail")
    verdict, notes = verify(p, sign(p))
    assert [r.split(" header.b=")[0] for r in verdict.auth_results] == [
        "dkim=pass header.d=example.com header.s=s1",
        "dkim=permerror (no key) header.d=example.com header.s=gone",
        "dkim=permerror (key revoked) header.d=example.com header.s=revoked",
        "dkim=temperror (key lookup failed) header.d=example.com header.s=flaky",
        "dkim=permerror (bad key record) header.d=example.com header.s=broken",
    ]
    assert [n["result"] for n in notes] == ["pass", "permerror", "permerror", "temperror", "permerror"]
    assert server.queries("flaky._domainkey.example.com", "TXT") >= 1


def test_malformed_and_sha1_signatures(services, keys):
    p = plugin(services, keys=[keys.make()])
    signed = sign(p)
    no_bh = re.sub(rb"bh=[^;]*;", b"", signed, count=1)
    verdict, _ = verify(p, no_bh)
    assert verdict.auth_results[0].startswith("dkim=neutral (missing bh=) header.d=example.com header.s=s1")
    verdict, _ = verify(p, signed.replace(b"a=rsa-sha256", b"a=rsa-sha1", 1))
    assert verdict.auth_results[0].startswith("dkim=permerror (rsa-sha1 is not accepted")
    verdict, notes = verify(p, b"DKIM-Signature: v=1; d=exa(mple.com; s=x y\r\n" + MESSAGE)
    assert verdict.auth_results == ("dkim=permerror (malformed d= or s=) header.d=invalid header.s=invalid",)
    assert notes[0]["result"] == "permerror"
    unparsable = signed.replace(b"To: Bob", b"To Bob")  # dkimpy refuses a field without a colon
    verdict, _ = verify(p, unparsable)
    assert verdict.auth_results[0].startswith("dkim=permerror (message header does not parse) header.d=example.com")


def test_no_signature_is_none(services):
    verdict, notes = verify(plugin(services), MESSAGE)
    assert verdict.auth_results == ("dkim=none",) and notes == []


def test_reject_on_fail_only_when_every_signature_fails(services, keys):
    p = plugin(services, keys=[keys.make(), keys.make(selector="s2")], reject_on_fail=True)
    signed = sign(p)
    verdict, _ = verify(p, tamper(signed))
    assert (verdict.action, verdict.code, verdict.esc) == ("reject", 550, "5.7.20")
    assert verify(p, signed)[0].action == "continue"
    one_bad = signed.replace(b"s=s2;", b"s=nokey;")  # one fails (no key), the other passes
    assert verify(p, one_bad)[0].action == "continue"
    assert verify(p, tamper(one_bad))[0].action == "continue"  # a permerror is no failure
    assert verify(plugin(services, keys=[keys.make(selector="s3")]), tamper(signed))[0].action == "continue"


def test_max_signatures(services, keys, logged):
    p = plugin(services, keys=[keys.make(selector=f"k{i}") for i in range(3)], max_signatures=2)
    verdict, notes = verify(p, sign(p))
    assert [n["selector"] for n in notes] == ["k0", "k1"]
    assert len(verdict.auth_results) == 2
    assert ("signatures_skipped", {"plugin": "dkim", "qid": "Q1", "count": 1}) in logged


# -- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,bits", [("rsa", 2048), ("ed25519", 0)])
def test_keygen_file_and_txt_record(services, server, tmp_path, algorithm, bits):
    private, public = dkim_keys.generate(algorithm, bits)
    path = tmp_path / "new.key"
    dkim_keys.write_key(path, private)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == private
    with pytest.raises(FileExistsError):
        dkim_keys.write_key(path, b"other")
    assert path.read_bytes() == private
    line = dkim_keys.txt_record("Example.COM", "2026a", algorithm, public)
    head = f'2026a._domainkey.example.com. IN TXT ( "v=DKIM1; k={algorithm}; p='
    assert line.startswith(head) and line.endswith('" )')
    strings = re.findall(r'"([^"]*)"', line)
    assert all(len(s) <= 255 for s in strings) and "".join(strings).endswith(public)
    if algorithm == "rsa":
        assert len(strings) > 1  # a 2048-bit key needs two strings
    server.add("2026a._domainkey.example.com", "TXT", strings)
    p = plugin(services, keys=[{"domain": "example.com", "selector": "2026a", "key_file": str(path)}])
    signed = sign(p)
    assert dkim.verify(signed, dnsfunc=dkimpy_dns(server)) is True
    assert verify(p, signed)[0].auth_results[0].startswith("dkim=pass header.d=example.com header.s=2026a")


def test_keygen_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 1024"):
        dkim_keys.generate("rsa", 512)
    with pytest.raises(ValueError, match="unknown key algorithm"):
        dkim_keys.generate("dsa")
    with pytest.raises(ValueError, match="selector"):
        dkim_keys.txt_record("example.com", "bad selector", "rsa", "AAAA")
    with pytest.raises(ValueError, match="base64"):
        dkim_keys.txt_record("example.com", "s1", "rsa", "not base64!")
    with pytest.raises(ValueError, match="32 octets"):
        dkim_keys.txt_record("example.com", "s1", "ed25519", "AAAA")
    with pytest.raises(OSError):
        dkim_keys.write_key(tmp_path / "missing-dir" / "k.key", b"x")


def test_key_files_the_plugin_reads(services, server, tmp_path, logged):
    # dkimpy's dknewkey writes an ed25519 key as its base64 seed; a PKCS#1 RSA PEM is usual too.
    seed_key = ed25519.Ed25519PrivateKey.generate()
    seed = seed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())
    (tmp_path / "seed.key").write_bytes(base64.b64encode(seed) + b"\n")
    os.chmod(tmp_path / "seed.key", 0o640)  # group-readable is fine (a dkim group, say)
    public = seed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    server.add("seed._domainkey.example.com", "TXT",
               dkim_keys.record_value("ed25519", base64.b64encode(public).decode()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "pkcs1.key").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    os.chmod(tmp_path / "pkcs1.key", 0o600)
    public = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    server.add("pkcs1._domainkey.example.com", "TXT",
               dkim_keys.record_strings("rsa", base64.b64encode(public).decode()))
    p = plugin(services, keys=[{"domain": "example.com", "selector": s, "key_file": str(tmp_path / f"{s}.key")}
                               for s in ("seed", "pkcs1")])
    signed = sign(p)
    assert (tag(signed, 0, "a"), tag(signed, 1, "a")) == ("ed25519-sha256", "rsa-sha256")
    assert [r.split(" ")[0] for r in verify(p, signed)[0].auth_results] == ["dkim=pass", "dkim=pass"]


# A 512-bit RSA key, made once with `openssl genrsa 512` for this test only: cryptography 45
# and newer refuse to generate keys under 1024 bits, but still load them.
SMALL_RSA_KEY = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA5LLsV0JP/5/yfZdH
v9VPLoum5J3SSACvdTO5cX2dz9BS8wlJljqqumBVXvvjk4OG3Nq+44wWIC4tOtr9
JyizAwIDAQABAkB1rF6RE2zIMct6tbFUUnRYlcC81zvQkpG1M3USoTjnKOeRTH2m
RIAENE1kNZbFStc8AsHtxZrAoN8RzOqfoixpAiEA/V7yK2n7RC7WIjzdFHtppd1x
zFgTpQK/RmblhvDmjg0CIQDnEnBMTUkflm54ZWnUk4W+1/5tuz+m4qF1B978seQR
TwIhANAHkcxlcwGTdwubb2WuwpqFzDacJlz4eXXjbBc0WghNAiAOBMhbWLT+/Zlm
JIDvLKQImAIPljSeY1F4UCnvGrvDcQIgair7xvlg5Nivj+JCSqUU9+HVh1glho+7
C2wrU4PdPSk=
-----END PRIVATE KEY-----
"""


def test_unusable_key_files_stop_the_start(services, tmp_path):
    def start_with(path):
        with pytest.raises(api.PluginError, match=re.escape(str(path))):
            plugin(services, keys=[{"domain": "example.com", "selector": "s1", "key_file": str(path)}])
    start_with(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    start_with(tmp_path / "junk.key")
    (tmp_path / "text.key").write_bytes(b"hello")
    start_with(tmp_path / "text.key")
    (tmp_path / "small.key").write_bytes(SMALL_RSA_KEY)
    start_with(tmp_path / "small.key")



def test_a_key_others_can_read_stops_the_start(services, tmp_path):
    path = tmp_path / "open.key"
    path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(path, 0o644)
    with pytest.raises(api.PluginError, match=r"open\.key: readable or writable by others \(mode 0644\); run chmod o-rwx"):
        plugin(services, keys=[{"domain": "example.com", "selector": "s1", "key_file": str(path)}])
    os.chmod(path, 0o640)  # group-readable is fine: the service's group
    plugin(services, keys=[{"domain": "example.com", "selector": "s1", "key_file": str(path)}])


@pytest.mark.parametrize("options,problem", [
    ({"max_signatures": 0}, "max_signatures:"),
    ({"keys": [{"domain": "example.com", "selector": "s1"}]}, "keys[0].key_file: expected a non-empty string"),
    ({"keys": [{"domain": "example.com", "selector": "s1", "key_file": "/k", "alg": "rsa"}]},
     "keys[0]: unknown key 'alg'"),
    ({"keys": ["example.com:s1:/k"]}, "keys[0]: must be a table {domain = ..., selector = ..., key_file = ...}"),
    ({"keys": [{"domain": "example.com", "selector": "s1", "key_file": "rel.key"}]}, "keys[0].key_file:"),
    ({"keys": [{"domain": "example com", "selector": "s1", "key_file": "/k"}]}, "keys[0].domain:"),
    ({"keys": [{"domain": "example.com", "selector": "s_1;", "key_file": "/k"}]}, "keys[0].selector:"),
    ({"keys": [{"domain": "example.com", "selector": "s1", "key_file": "/a"},
               {"domain": "EXAMPLE.com", "selector": "s1", "key_file": "/b"}]}, "keys[1]:"),
    ({"sign_headers": ["from", "received"]}, "sign_headers:"),
    ({"sign_headers": ["from", "bad:name"]}, "sign_headers:"),
])
def test_bad_options(options, problem):
    with pytest.raises(api.PluginError) as info:
        DkimPlugin("dkim").configure(dict(DkimPlugin.options, **options))
    assert str(info.value).startswith(problem)
