"""Server-side TLS: the SSL contexts for STARTTLS (RFC 3207) and implicit TLS (RFC 8314).

Contexts are built once per certificate set, never per connection: creating one loads and
parses the chain and key, which costs far more than a handshake's share of the CPU.  The
first certificate is the default; the others are chosen by the client's SNI name (RFC 6066
§3) through the default context's sni_callback.

The files are loaded again on SIGHUP (reload()) and when they change on disk (check(), which
looks at their mtimes at most every tls.reload_interval seconds).  A new set that fails to
load is logged and the contexts in use are kept: a bad renewal must not take TLS down.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from elemta import filemodes
from elemta import log as logmod
from elemta.config import Certificate, TlsConfig
from elemta.errors import ConfigError
from elemta.smtp import tickets

# The TLS 1.2 suites offered when tls.ciphers is "": Mozilla's "intermediate" list (server side
# TLS guidelines, version 5.7), the suites RFC 9325 §4.2 recommends: ephemeral (EC)DHE key
# exchange for forward secrecy and AEAD ciphers only.  OpenSSL's own default also allows static
# RSA key exchange (AES256-GCM-SHA384; RFC 9325 §4.1: SHOULD NOT) and CBC with HMAC-SHA1
# (AES128-SHA), which this leaves out.  The DHE suites need DH parameters, which Python's
# server contexts do not load, so in practice ECDHE is used.  TLS 1.3's own suites are set
# apart by OpenSSL (SSL_CTX_set_ciphersuites) and are all AEAD with ephemeral keys: unaffected.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


@dataclass(frozen=True)
class TlsInfo:
    """What a session and its Received header know of the TLS under it."""

    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    bits: int

    @classmethod
    def of(cls, sock: ssl.SSLSocket) -> TlsInfo:
        name, _, bits = sock.cipher() or ("", "", 0)
        return cls(sock.version() or "", name, bits or 0)

    def __str__(self) -> str:
        return f"{self.version} with cipher {self.cipher} ({self.bits}/{self.bits} bits)"


def certificate_names(path: str) -> list[str]:
    """The DNS names of the first certificate in a PEM file (subjectAltName, else the CN).

    The ssl module decodes certificates only through this long-standing helper that CPython's
    own tests use; without it, SNI selection falls back to the default certificate.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return []
    cert = decode(path)
    names = [value.lower() for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in cert.get("subject", ()):
            names += [value.lower() for key, value in rdn if key == "commonName"]
    return names


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4.3: a wildcard only as the whole left-most label, matching one label."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


class ServerTls:
    """The current contexts; thread-safe to read while a reload swaps them."""

    def __init__(self, config: TlsConfig, log: Callable[..., None] = lambda event, **fields: None, *,
                 ticket_secret: bytes | None = None, clock: Callable[[], float] = time.time):
        """ticket_secret: the SMTP workers' shared secret for session-ticket keys (tickets.py);
        None leaves each context OpenSSL's own random keys."""
        self.config = config
        self.log = log
        self._lock = threading.Lock()
        self._default: ssl.SSLContext | None = None
        self._by_name: list[tuple[str, ssl.SSLContext]] = []
        self._contexts: list[ssl.SSLContext] = []
        self._stamps: tuple = ()
        self._checked = time.monotonic()
        self._ticket_secret = ticket_secret
        self._clock = clock
        self._period: int | None = None  # the ticket keys' rotation period in force
        self._ticket_warned = False
        if config.certificates:
            self._install(*self._build(config))  # ConfigError at start-up: refuse to start

    @property
    def available(self) -> bool:
        return self._default is not None

    def context(self) -> ssl.SSLContext:
        context = self._default
        if context is None:
            raise ConfigError("tls: no certificate configured")
        return context

    # ---- reloading ------------------------------------------------------------------------

    def reload(self, config: TlsConfig | None = None) -> bool:
        """Load the files again (SIGHUP); on failure keep what is in use. True if loaded."""
        config = config or self.config
        if not config.certificates:
            with self._lock:
                self.config, self._default, self._by_name, self._stamps = config, None, [], ()
            return True
        try:
            built = self._build(config)
        except ConfigError as exc:
            self.log("tls_reload_failed", level=logmod.WARNING, error=str(exc), kept="previous certificates")
            return False
        self.config = config
        self._install(*built)
        self.log("tls_loaded", certificates=len(config.certificates),
                 names=",".join(name for name, _ in self._by_name) or "-")
        return True

    def check(self) -> None:
        """Reload if a file changed; stats the files at most every reload_interval seconds.
        Called about once a second: also moves the ticket keys on at each rotation."""
        if self._ticket_secret is not None and tickets.period(self._clock()) != self._period:
            with self._lock:
                contexts = list(self._contexts)
            self._set_ticket_keys(contexts)
        interval = self.config.reload_interval
        now = time.monotonic()
        if not interval or not self.config.certificates or now - self._checked < interval:
            return
        self._checked = now
        if _stamps(self.config.certificates) != self._stamps:
            self.reload()

    # ---- building -------------------------------------------------------------------------

    def _build(self, config: TlsConfig) -> tuple:
        stamps = _stamps(config.certificates)
        contexts, problems = [], []
        for index, cert in enumerate(config.certificates):
            path = f"tls.certificates[{index}]"
            try:
                context = _context(config, cert, path)
            except ConfigError as exc:  # go on: every bad certificate is reported at once
                problems += [line for line in exc.problems if line not in problems]  # tls.ciphers once
                continue
            try:
                names = certificate_names(cert.cert_file)
            except (OSError, ssl.SSLError, ValueError):
                names = []
            contexts.append((context, names))
        if problems:
            raise ConfigError(*problems)
        return contexts, stamps

    def _install(self, contexts: list, stamps: tuple) -> None:
        default = contexts[0][0]
        by_name = [(name, context) for context, names in contexts for name in names]
        default.sni_callback = self._choose
        self._set_ticket_keys([context for context, _ in contexts])
        with self._lock:
            self._default, self._by_name, self._stamps = default, by_name, stamps
            self._contexts = [context for context, _ in contexts]

    def _set_ticket_keys(self, contexts: list[ssl.SSLContext]) -> None:
        """Give contexts this period's shared ticket keys, so any worker resumes any other's
        sessions; if that cannot be done here, say so once and keep OpenSSL's own keys."""
        if self._ticket_secret is None:
            return
        self._period = tickets.period(self._clock())
        keys = tickets.keys_for(self._ticket_secret, self._period)
        if not all([tickets.install(context, keys) for context in contexts]) and not self._ticket_warned:
            self._ticket_warned = True
            self.log("tls_tickets_unshared", level=logmod.WARNING,
                     error="cannot set TLS ticket keys here: each worker keeps its own, so a "
                           "session resumes only on the worker that made it")

    def _choose(self, sock: ssl.SSLObject, server_name: str | None, _context) -> None:
        """sni_callback: switch to the certificate for the name asked for; no SNI or no
        match keeps the default one (returning None lets the handshake go on)."""
        name = (server_name or "").lower().rstrip(".")
        context = next((c for pattern, c in self._by_name if name_matches(pattern, name)), None)
        if context is not None and context is not sock.context:
            sock.context = context


def _context(config: TlsConfig, cert: Certificate, path: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    # No TLS compression (CRIME) and no client-initiated renegotiation (a CPU-exhaustion lever).
    context.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.set_ciphers(config.ciphers or DEFAULT_CIPHERS)
    except ssl.SSLError:
        raise ConfigError(f"tls.ciphers: {config.ciphers!r} selects no cipher OpenSSL knows") from None
    for name in filter(None, (cert.cert_file, cert.key_file)):
        # load_cert_chain's own errors do not say which file; these do.
        if not os.path.exists(name):
            raise ConfigError(f"{path}: {name}: no such file")
        if not os.access(name, os.R_OK):
            raise ConfigError(f"{path}: {name}: permission denied (read as user {filemodes.current_user()})")
    # The file with the private key: key_file, or cert_file when the key is in it.
    filemodes.check_secret(cert.key_file or cert.cert_file, f"{path}.key_file")
    try:
        context.load_cert_chain(cert.cert_file, cert.key_file or None)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ConfigError(f"{path}: {cert.cert_file}: cannot load certificate and key ({reason})") from None
    return context


def _stamps(certificates: tuple[Certificate, ...]) -> tuple:
    """What changes when a file is replaced or rewritten: (mtime_ns, size, inode) of each."""
    stamps: list[tuple[int, int, int] | None] = []
    for cert in certificates:
        for path in (cert.cert_file, cert.key_file):
            if not path:
                continue
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
    return tuple(stamps)
