"""Fetching an MTA-STS policy over HTTPS (RFC 8461 §3.3): the I/O that mtasts.py leaves out.

GET https://mta-sts.<domain>/.well-known/mta-sts.txt with the certificate verified for that
name (RFC 6125, against the system's CAs or delivery.ca_file), answered 200 with a text/plain
body of at most mtasts.MAX_POLICY_SIZE octets.  A redirect is a failure, never followed (§3.3).
The caller resolves the host (through elemta's own resolver, as delivery does) and gives the
addresses; each is tried in turn.  Every failure is a FetchError whose text goes to the log and
to the attempt history, so an admin can see why a policy was not applied.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Sequence

from elemta.delivery.mtasts import MAX_POLICY_SIZE, POLICY_PATH

FETCH_TIMEOUT = 20.0  # seconds for the whole fetch from one address (§3.3 asks for a limit)


class FetchError(Exception):
    """The policy could not be fetched; the text says why."""


def fetch_policy(domain: str, addresses: Sequence[str], *, port: int = 443, ca_file: str | None = None,
                 timeout: float = FETCH_TIMEOUT) -> bytes:
    """The policy body of domain, from the first of `addresses` that gives one."""
    host = f"mta-sts.{domain.rstrip('.').lower()}"
    context = ssl.create_default_context(cafile=ca_file)  # verifies the chain and the name
    if not addresses:
        raise FetchError(f"{host} has no address")
    problems = []
    for address in addresses:
        try:
            return _fetch_from(host, address, port, context, timeout)
        except FetchError as exc:
            problems.append(f"{address}: {exc}")
    raise FetchError("; ".join(problems))


def _fetch_from(host: str, address: str, port: int, context: ssl.SSLContext, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    conn = PinnedConnection(host, address, port, context, timeout)
    try:
        conn.request("GET", POLICY_PATH, headers={"Accept": "text/plain", "Connection": "close"})
        response = conn.getresponse()
        if response.status != 200:  # §3.3: only a 200 is a policy; 3xx is never followed
            raise FetchError(f"HTTP {response.status} {response.reason[:60]}")
        media_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if media_type != "text/plain":  # §3.3
            raise FetchError(f"media type {media_type[:60] or 'none'}, not text/plain")
        body = b""
        while len(body) <= MAX_POLICY_SIZE:
            if time.monotonic() > deadline:
                raise FetchError(f"not read within {timeout:g} seconds")
            chunk = response.read1(MAX_POLICY_SIZE + 1 - len(body))
            if not chunk:
                return body
            body += chunk
        raise FetchError(f"policy larger than {MAX_POLICY_SIZE} octets")
    except ssl.SSLCertVerificationError as exc:
        raise FetchError(f"certificate not valid for {host}: {exc.verify_message}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"{type(exc).__name__}: {str(exc)[:120] or 'no detail'}") from None
    finally:
        conn.close()


class PinnedConnection(http.client.HTTPSConnection):
    """An HTTPS connection to one address, its certificate checked for host (SNI too); TLS
    reports are posted over it too (tlsrpt_store.py)."""

    def __init__(self, host: str, address: str, port: int, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self.host)
