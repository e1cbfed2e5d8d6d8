"""elemta.delivery.smtp_tls: each TLS policy's client context, and the handshake against a real
TLS server (a trustme certificate for mx.test) over a socket pair."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from elemta.delivery import smtp_tls


def test_may_and_encrypt_check_nothing_and_verify_checks_the_name_and_the_chain(ca_file):
    for policy in ("may", "encrypt"):
        context = smtp_tls.client_context(policy, None)
        assert (context.check_hostname, context.verify_mode) == (False, ssl.CERT_NONE)
    verify = smtp_tls.client_context("verify", ca_file)
    assert (verify.check_hostname, verify.verify_mode) == (True, ssl.CERT_REQUIRED)


def test_encrypt_and_verify_ask_tls_1_2_at_least():
    for policy in ("encrypt", "verify"):
        assert smtp_tls.client_context(policy, None).minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_policys_context_is_made_once():
    assert smtp_tls.client_context("may", None) is smtp_tls.client_context("may", None)
    assert smtp_tls.client_context("may", None) is not smtp_tls.client_context("encrypt", None)


def handshake_with(server_tls, policy, name, ca_file):
    """smtp_tls.handshake() against a TLS server on the other end of a socket pair: the
    version it agreed on."""
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.settimeout(10)
    served = []

    def serve():
        try:
            with server_tls.wrap_socket(theirs, server_side=True) as tls:
                served.append(tls.version())
                tls.recv(1)  # until the client closes
        except (OSError, ssl.SSLError) as exc:
            served.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        tls = smtp_tls.handshake(ours, policy, name, ca_file)
        version = tls.version()
        tls.close()
        return version
    finally:
        ours.close()
        thread.join(10)
        theirs.close()


@pytest.mark.parametrize("policy", ["may", "encrypt"])
def test_opportunistic_policies_take_any_certificate(server_tls, policy):
    assert handshake_with(server_tls, policy, "not-the-name.example", None) in ("TLSv1.2", "TLSv1.3")


def test_verify_takes_the_right_name_and_refuses_another(server_tls, ca_file):
    assert handshake_with(server_tls, "verify", "mx.test", ca_file) in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake_with(server_tls, "verify", "other.test", ca_file)


def test_verify_refuses_an_unknown_ca(server_tls, tmp_path):
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake_with(server_tls, "verify", "mx.test", str(other))
