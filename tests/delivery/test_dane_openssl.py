"""delivery/dane_openssl.py: OpenSSL checks TLSA records in real TLS handshakes on loopback."""

import hashlib
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from elemta.delivery import dane_openssl
from elemta.delivery.dane import Tlsa

pytestmark = pytest.mark.skipif(not dane_openssl.available(), reason="no DANE in this Python's OpenSSL")

MX = "mx.example.test"


def der(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def record(usage, selector, mtype, cert: x509.Certificate) -> Tlsa:
    data = cert.public_bytes(serialization.Encoding.DER) if selector == 0 else cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return Tlsa(usage, selector, mtype, data)


class TlsServer:
    """Accepts connections on 127.0.0.1 and completes TLS handshakes with one certificate chain."""

    def __init__(self, leaf):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(self.context)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate

    def stop(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone would not)
        self.listener.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def chain(ca):
    """A CA, an intermediate (the DANE-TA here: servers send it) and leaves issued by it."""
    intermediate = ca.create_child_ca()
    return intermediate, intermediate.issue_cert(MX), intermediate.issue_cert("other.test")


@pytest.fixture
def serve():
    servers = []

    def start(leaf):
        servers.append(TlsServer(leaf))
        return servers[-1].port

    yield start
    for s in servers:
        s.stop()


def handshake(port, records, names=(MX,), ca_file=None):
    """Connect with DANE; the matched record's (usage, selector, type), or the SSL error."""
    context = dane_openssl.client_context(ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        tls = context.wrap_socket(raw, server_hostname=MX, do_handshake_on_connect=False)
        taken = dane_openssl.prepare(tls, context, MX, names, records)
        assert taken == sum(1 for r in records if r.usable)
        tls.do_handshake()
        assert tls.recv(2) == b"ok"
        return dane_openssl.matched(tls)


@pytest.mark.parametrize("selector, mtype", [(1, 1), (0, 1), (1, 2), (0, 2), (1, 0)])
def test_dane_ee_matches_the_servers_own_certificate_or_key(chain, serve, selector, mtype):
    _, leaf, _ = chain
    port = serve(leaf)
    assert handshake(port, [record(3, selector, mtype, der(leaf.cert_chain_pems[0].bytes()))]) == (3, selector, mtype)


def test_dane_ee_ignores_the_names_in_the_certificate(chain, serve):
    _, _, other = chain  # issued for other.test: RFC 7672 §3.1.1, names do not matter for DANE-EE
    port = serve(other)
    assert handshake(port, [record(3, 1, 1, der(other.cert_chain_pems[0].bytes()))]) == (3, 1, 1)


def test_a_record_for_another_key_fails_even_when_the_ca_would_vouch(chain, serve, ca_file):
    _, leaf, other = chain
    port = serve(leaf)
    with pytest.raises(ssl.SSLCertVerificationError, match="no matching DANE TLSA records"):
        handshake(port, [record(3, 1, 1, der(other.cert_chain_pems[0].bytes()))], ca_file=ca_file)


def test_dane_ta_matches_the_issuer_the_server_sends_and_checks_the_name(chain, serve):
    intermediate, leaf, other = chain
    ta = record(2, 0, 1, der(intermediate.cert_pem.bytes()))
    assert handshake(serve(leaf), [ta]) == (2, 0, 1)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(serve(other), [ta])  # right issuer, wrong name: RFC 7672 §3.2.2
