"""TLS session tickets that every SMTP worker can open: one key set, derived, rotated hourly.

A server's TLS session ticket is the session's state, encrypted and authenticated with the
server's ticket keys; a client that shows it again resumes without a full handshake (RFC 5077
for TLS 1.2, RFC 8446 section 4.6.1 for TLS 1.3). OpenSSL makes random ticket keys for each
SSL_CTX, so each worker process had its own and a ticket from one worker failed on any other:
with two workers, about half of all resumptions.

Every worker now computes the same keys: HMAC-SHA256 over the hour's number, keyed with a
secret the supervisor makes at start (in the shared memory, shm.py), expanded to the 80 bytes
OpenSSL takes (a 16-byte key name, a 32-byte HMAC key, a 32-byte AES key). The workers agree
without talking, and a worker started later computes the same keys. At each full hour the
keys change: a ticket of the hour before then fails to decrypt and the client makes a full
handshake (OpenSSL's SSL_CTX_set_tlsext_ticket_keys holds one key set; a callback that also
accepts the previous set would run Python inside each handshake). So no ticket outlives its
hour, and a stolen key opens at most one hour of TLS 1.2 sessions (TLS 1.3 resumption adds an
(EC)DHE exchange by default). The secret itself never touches a disk; a restart makes a new
one.

Python's ssl module has no call for ticket keys, so they are set through ctypes on the
SSL_CTX under the SSLContext: CPython's SSLContext object holds the SSL_CTX pointer right
after its object header. Every step is checked before anything is written (the libssl loaded
in this process is the version the ssl module reports, and the pointer found answers
SSL_CTX_get_options with the context's own options and gives its current keys back);
otherwise install() returns False, the caller logs it once, and each worker keeps its own keys.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import re
import ssl
import time

ROTATION = 3600  # seconds a key set is used; tickets live no longer (the session timeout)
KEYS_SIZE = 80  # name 16, HMAC key 32, AES key 32: OpenSSL 1.1.0 and later
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS (openssl/ssl.h)
_GET_TICKET_KEYS = 58  # SSL_CTRL_GET_TLSEXT_TICKET_KEYS


def period(now: float | None = None) -> int:
    """The number of the rotation period `now` (seconds since the epoch) falls in."""
    return int((time.time() if now is None else now) // ROTATION)


def keys_for(secret: bytes, number: int) -> bytes:
    """The ticket key set of period `number`: HKDF-Expand (RFC 5869 section 2.3) with
    HMAC-SHA256, the secret as the pseudorandom key and the period as the info."""
    info = b"elemta tls ticket keys " + str(number).encode()
    out, block, counter = b"", b"", 1
    while len(out) < KEYS_SIZE:
        block = hmac.new(secret, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:KEYS_SIZE]


class _LibSsl:
    """The libssl the ssl module uses, through ctypes; None where it cannot be found for sure."""

    def __init__(self, lib: ctypes.CDLL):
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64
        self.set_timeout = lib.SSL_CTX_set_timeout
        self.set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
        self.set_timeout.restype = ctypes.c_long

    @classmethod
    def load(cls) -> _LibSsl | None:
        path = _mapped_libssl()
        if path is None:
            return None
        try:
            lib = ctypes.CDLL(path)  # already mapped: the same library, not a second copy
            version = lib.OpenSSL_version_num
            version.restype = ctypes.c_ulong
            if version() != ssl.OPENSSL_VERSION_NUMBER:
                return None
            return cls(lib)
        except (OSError, AttributeError):
            return None


def _mapped_libssl() -> str | None:
    """The path of the one libssl.so this process has mapped (the ssl module's), if one."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            fields = [line.split(None, 5) for line in maps]
    except OSError:
        return None
    paths = {parts[5].strip() for parts in fields if len(parts) == 6}
    found = {path for path in paths if re.search(r"/libssl\.so(\.[\d.]+)?$", path)}
    return found.pop() if len(found) == 1 else None


_LIB: list[_LibSsl | None] = []  # loaded on first use


def _lib() -> _LibSsl | None:
    if not _LIB:
        _LIB.append(_LibSsl.load())
    return _LIB[0]


def _ssl_ctx(context: ssl.SSLContext, lib: _LibSsl) -> int | None:
    """The SSL_CTX pointer of context, if it checks out."""
    if type(context).__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        return None
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.get_options(pointer) != int(context.options):
        return None
    current = ctypes.create_string_buffer(KEYS_SIZE)
    if lib.ctrl(pointer, _GET_TICKET_KEYS, KEYS_SIZE, current) != 1:
        return None
    return pointer


def install(context: ssl.SSLContext, keys: bytes) -> bool:
    """Make context encrypt and open session tickets with keys (and keep sessions for no
    longer than a rotation period). False, with nothing changed, if that cannot be done
    safely here."""
    if len(keys) != KEYS_SIZE:
        raise ValueError(f"ticket keys are {KEYS_SIZE} bytes, not {len(keys)}")
    lib = _lib()
    if lib is None:
        return False
    pointer = _ssl_ctx(context, lib)
    if pointer is None:
        return False
    if lib.ctrl(pointer, _SET_TICKET_KEYS, KEYS_SIZE, ctypes.c_char_p(keys)) != 1:
        return False
    lib.set_timeout(pointer, ROTATION)
    return True
