"""The TLS side of outbound STARTTLS: the client context of each TLS policy, and the handshake,
checked by OpenSSL against the TLSA records when DANE applies (dane_openssl.py).
smtp_client.SmtpConnection sends the STARTTLS and maps what fails here to its replies.
"""

from __future__ import annotations

import functools
import socket
import ssl

from elemta.delivery import dane_openssl
from elemta.delivery.dane import DaneCheck


@functools.lru_cache(maxsize=16)
def client_context(policy: str, ca_file: str | None) -> ssl.SSLContext:
    """The context of a TLS policy ('may', 'encrypt', 'verify'), shared by every connection."""
    # Cached: loading the system CA store for each connection is slow; contexts are
    # thread-safe.  A changed ca_file is read again after a restart.
    if policy == "verify":
        context = ssl.create_default_context(cafile=ca_file)
    else:
        # 'may' and 'encrypt' only defeat passive listeners (RFC 7435): most MX hosts
        # have no certificate matching their name, so nothing is verified.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if policy != "may" and context.minimum_version < ssl.TLSVersion.TLSv1_2:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The cipher list stays OpenSSL's default on purpose, unlike the listeners' (smtp/tls.py
    # DEFAULT_CIPHERS): the server picks, OpenSSL lists the forward-secret AEAD suites first,
    # so any current MX gets them; a server that knows only static RSA or CBC-SHA1 would
    # otherwise get the mail in plain text ('may', RFC 7435 §3: some protection beats none)
    # or not at all ('encrypt', 'verify'), as Postfix's smtp_tls_mandatory_ciphers = medium.
    return context


@functools.lru_cache(maxsize=4)
def _dane_context(ca_file: str | None) -> ssl.SSLContext:
    return dane_openssl.client_context(ca_file)


def handshake(sock: socket.socket, policy: str, server_name: str, ca_file: str | None,
              dane: DaneCheck | None = None) -> ssl.SSLSocket:
    """The TLS handshake on a connected socket, after the server's 220 to STARTTLS.

    Raises ssl.SSLCertVerificationError (not verified), another OSError or ValueError (no
    handshake), or dane_openssl.DaneUnavailable (OpenSSL took none of the TLSA records).
    """
    if dane is None:
        return client_context(policy, ca_file).wrap_socket(sock, server_hostname=server_name or None)
    context = _dane_context(ca_file)
    tls = context.wrap_socket(sock, server_hostname=server_name or None, do_handshake_on_connect=False)
    if not dane_openssl.prepare(tls, context, dane.base_domain, dane.names, dane.records):
        raise dane_openssl.DaneUnavailable("OpenSSL took none of the TLSA records")
    tls.do_handshake()
    return tls
