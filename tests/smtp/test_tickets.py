"""TLS session tickets shared by the workers (smtp/tickets.py): a session one ServerTls made
resumes on another built apart with the same secret, as two worker processes do."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from elemta.config import Certificate, TlsConfig
from elemta.smtp import tickets
from elemta.smtp.tls import ServerTls

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture()
def tls_config(tmp_path, ca):
    path = tmp_path / "mx.pem"
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(path))
    path.chmod(0o600)
    return TlsConfig(certificates=(Certificate(cert_file=str(path)),), reload_interval=0)


def handshake(server: ServerTls, client: ssl.SSLContext, session=None) -> tuple[bool, ssl.SSLSession]:
    """One TLS connection over a socket pair; (was the session resumed, the session to keep)."""
    near, far = socket.socketpair()
    errors = []

    def serve() -> None:
        try:
            with server.context().wrap_socket(far, server_side=True) as tls:
                tls.sendall(b"hi")  # TLS 1.3 tickets follow the handshake: the client reads them
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(near, server_hostname="mx.test.example", session=session) as tls:
        assert tls.recv(2) == b"hi"
        reused, kept = tls.session_reused, tls.session
        tls.sendall(b".")
    thread.join(10)
    assert not errors, errors
    return reused, kept


def client_context(ca, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    context.minimum_version = context.maximum_version = version
    return context


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_resumes_on_another_worker_with_the_same_secret(tls_config, ca, version):
    secret = b"s" * 32
    one, other = ServerTls(tls_config, ticket_secret=secret), ServerTls(tls_config, ticket_secret=secret)
    client = client_context(ca, version)
    reused, session = handshake(one, client)
    assert not reused
    assert handshake(other, client, session)[0], "the other worker could not open the ticket"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_without_a_shared_secret_it_does_not(tls_config, ca, version):
    one, other = ServerTls(tls_config, ticket_secret=b"a" * 32), ServerTls(tls_config, ticket_secret=b"b" * 32)
    client = client_context(ca, version)
    _, session = handshake(one, client)
    assert not handshake(other, client, session)[0]
    assert handshake(one, client, session)[0]  # the worker that made it still can


def test_at_a_rotation_old_tickets_need_a_full_handshake(tls_config, ca):
    now = [1_000_000.0 * tickets.ROTATION]
    server = ServerTls(tls_config, ticket_secret=b"s" * 32, clock=lambda: now[0])
    client = client_context(ca, ssl.TLSVersion.TLSv1_3)
    _, session = handshake(server, client)
    now[0] += tickets.ROTATION - 1
    server.check()
    assert handshake(server, client, session)[0]  # the same hour
    now[0] += 1
    server.check()  # the workers' main loops call this once a second
    reused, fresh = handshake(server, client, session)
    assert not reused
    assert handshake(server, client, fresh)[0]  # the new hour's ticket works


def test_keys_are_the_same_for_the_same_secret_and_period_only():
    assert tickets.keys_for(b"s" * 32, 7) == tickets.keys_for(b"s" * 32, 7)
    assert len(tickets.keys_for(b"s" * 32, 7)) == tickets.KEYS_SIZE
    assert tickets.keys_for(b"s" * 32, 7) != tickets.keys_for(b"s" * 32, 8)
    assert tickets.keys_for(b"s" * 32, 7) != tickets.keys_for(b"t" * 32, 7)


def test_where_libssl_cannot_be_found_the_server_still_works_and_says_so(tls_config, ca, monkeypatch):
    monkeypatch.setattr(tickets, "_LIB", [None])
    lines = []
    server = ServerTls(tls_config, lambda event, **fields: lines.append(event), ticket_secret=b"s" * 32)
    assert lines == ["tls_tickets_unshared"]
    client = client_context(ca, ssl.TLSVersion.TLSv1_3)
    _, session = handshake(server, client)
    assert handshake(server, client, session)[0]  # its own keys still resume its own sessions
    server.check()
    assert lines == ["tls_tickets_unshared"]  # once, not at every check


def test_a_context_whose_pointer_does_not_check_out_is_left_alone(monkeypatch):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lib = tickets._lib()
    if lib is None:
        pytest.skip("no libssl to check against here")
    monkeypatch.setattr(lib, "get_options", lambda pointer: -1)
    assert tickets.install(context, tickets.keys_for(b"s" * 32, 1)) is False
