"""smtp/tls.py: contexts, SNI names, minimum version, reloads that keep a good certificate."""

from __future__ import annotations

import os
import ssl

import pytest

from elemta.config import Certificate, TlsConfig
from elemta.errors import ConfigError
from elemta.smtp.tls import ServerTls, certificate_names, name_matches

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def pem(ca, tmp_path, name: str, *names: str) -> str:
    path = tmp_path / f"{name}.pem"
    ca.issue_cert(name, *names).private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("pattern, name, matches", [
    ("mx.example.org", "mx.example.org", True),
    ("*.example.org", "mx.example.org", True),
    ("*.example.org", "example.org", False),
    ("*.example.org", "a.b.example.org", False),  # RFC 6125 §6.4.3: one label only
    ("*.example.org", ".example.org", False),
    ("mx.example.org", "mx.example.org.evil", False),
])
def test_name_matches(pattern, name, matches):
    assert name_matches(pattern, name) is matches


def test_certificate_names_are_the_dns_alt_names(ca, tmp_path):
    assert certificate_names(pem(ca, tmp_path, "mx.example.org", "*.Example.NET")) == [
        "mx.example.org", "*.example.net"]


def test_contexts_follow_the_config(ca, tmp_path):
    config = TlsConfig(certificates=(Certificate(pem(ca, tmp_path, "mx.example.org")),), min_version="TLSv1.3")
    context = ServerTls(config).context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.options & ssl.OP_NO_COMPRESSION


@pytest.mark.parametrize("change, message", [
    ({"cert_file": "/nonexistent/cert.pem"}, r"tls\.certificates\[0\]: /nonexistent/cert\.pem: no such file"),
    ({"key_file": "@SELF@"}, r"tls\.certificates\[0\]: .*cannot load certificate and key"),
])
def test_a_bad_certificate_stops_the_start_with_a_clear_error(ca, tmp_path, change, message):
    good = pem(ca, tmp_path, "mx.example.org")
    other = tmp_path / "notakey.pem"
    other.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    fields = {"cert_file": good, **change}
    if fields.get("key_file") == "@SELF@":
        fields["key_file"] = str(other)
    with pytest.raises(ConfigError, match=message):
        ServerTls(TlsConfig(certificates=(Certificate(**fields),)))


def test_bad_ciphers_are_a_config_error(ca, tmp_path):
    config = TlsConfig(certificates=(Certificate(pem(ca, tmp_path, "mx.example.org")),), ciphers="NOTACIPHER")
    with pytest.raises(ConfigError, match=r"tls\.ciphers"):
        ServerTls(config)


def test_reload_keeps_the_old_contexts_when_the_new_files_are_bad(ca, tmp_path):
    path = pem(ca, tmp_path, "mx.example.org")
    events = []
    tls = ServerTls(TlsConfig(certificates=(Certificate(path),), reload_interval=0),
                    log=lambda event, **fields: events.append(event))
    before = tls.context()
    with open(path, "w") as handle:
        handle.write("garbage")
    assert tls.reload() is False
    assert tls.context() is before and events == ["tls_reload_failed"]
    ca.issue_cert("mx.example.org").private_key_and_cert_chain_pem.write_to_path(path)
    assert tls.reload() is True
    assert tls.context() is not before and events[-1] == "tls_loaded"


def test_check_reloads_only_when_a_file_changed(ca, tmp_path, monkeypatch):
    path = pem(ca, tmp_path, "mx.example.org")
    clock = [1000.0]
    monkeypatch.setattr("elemta.smtp.tls.time.monotonic", lambda: clock[0])
    tls = ServerTls(TlsConfig(certificates=(Certificate(path),), reload_interval=60))
    first = tls.context()
    clock[0] += 61
    tls.check()
    assert tls.context() is first  # nothing changed on disk
    ca.issue_cert("mx.example.org").private_key_and_cert_chain_pem.write_to_path(path)
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the file system's resolution
    tls.check()
    assert tls.context() is first  # not yet: the interval has not passed
    clock[0] += 61
    tls.check()
    assert tls.context() is not first


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """A TLS handshake in memory between the two contexts; the cipher agreed on."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(client_in, client_out, server_hostname="mx.example.org")
    tls_server = server.wrap_bio(server_in, server_out, server_side=True)
    done = {tls_client: False, tls_server: False}
    for _ in range(20):  # a TLS 1.2 handshake is two round trips; this only bounds a bug
        for end in (tls_client, tls_server):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return tls_server.cipher()[0]
    raise AssertionError("handshake did not finish")


class RsaCA:
    """A CA issuing RSA keys: the TLS 1.2 suites below are RSA-authenticated, and trustme 1.0
    and newer make ECDSA keys by default (with which no RSA suite could be agreed at all)."""

    def __init__(self):
        key_type = getattr(trustme, "KeyType", None)
        self.rsa = {} if key_type is None else {"key_type": key_type.RSA}
        self.ca = trustme.CA(**self.rsa)

    def issue_cert(self, *names):
        return self.ca.issue_cert(*names, **self.rsa)


@pytest.fixture(scope="module")
def rsa_ca():
    return RsaCA()


def _tls12_client(ciphers: str) -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # the TLS 1.3 suites are not in question
    client.set_ciphers(ciphers)
    return client


@pytest.mark.parametrize("offered", [
    "AES128-SHA",  # static RSA key exchange and CBC with HMAC-SHA1
    "AES256-GCM-SHA384",  # AEAD, but static RSA: no forward secrecy
    "ECDHE-RSA-AES128-SHA",  # forward secret, but CBC with HMAC-SHA1
])
def test_tls12_refuses_suites_without_forward_secrecy_or_aead_by_default(rsa_ca, tmp_path, offered):
    server = ServerTls(TlsConfig(certificates=(Certificate(pem(rsa_ca, tmp_path, "mx.example.org")),))).context()
    with pytest.raises(ssl.SSLError):
        _handshake(server, _tls12_client(offered))


@pytest.mark.parametrize("offered", ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"])
def test_tls12_accepts_forward_secret_aead_suites_by_default(rsa_ca, tmp_path, offered):
    server = ServerTls(TlsConfig(certificates=(Certificate(pem(rsa_ca, tmp_path, "mx.example.org")),))).context()
    assert _handshake(server, _tls12_client(offered)) == offered


def test_tls_ciphers_lets_an_admin_allow_more(rsa_ca, tmp_path):
    config = TlsConfig(certificates=(Certificate(pem(rsa_ca, tmp_path, "mx.example.org")),),
                       ciphers="DEFAULT:AES128-SHA")
    assert _handshake(ServerTls(config).context(), _tls12_client("AES128-SHA")) == "AES128-SHA"


def test_every_bad_certificate_is_reported_at_once(ca, tmp_path):
    good = pem(ca, tmp_path, "mx.example.org")
    config = TlsConfig(certificates=(Certificate("/nonexistent/a.pem"), Certificate(good),
                                     Certificate("/nonexistent/b.pem")))
    with pytest.raises(ConfigError) as caught:
        ServerTls(config)
    assert caught.value.problems == ["tls.certificates[0]: /nonexistent/a.pem: no such file",
                                     "tls.certificates[2]: /nonexistent/b.pem: no such file"]
