"""DANE verification (RFC 7671, RFC 7672) by OpenSSL itself, reached from Python's ssl module.

Python's ssl module has no DANE API, and checking TLSA records by hand would mean building and
checking certificate chains in Python.  OpenSSL has done DANE since 1.1.0 (SSL_dane_enable,
SSL_dane_tlsa_add: the same code Postfix uses), so this module hands it the records through
ctypes: the SSL_CTX and SSL pointers are read from the Python objects (in CPython's _ssl
module, the first field of a context after the object header is its SSL_CTX *, the second of a
socket's TLS object its SSL *) and checked against each other before any use: an SSL whose
SSL_CTX is not the context's own means an unknown layout, and DANE is then unavailable (the
caller defers the mail; it never falls back to an unauthenticated connection).  The functions
come from the library the _ssl module itself is linked with.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from collections.abc import Sequence

from elemta.delivery.dane import Tlsa

# OpenSSL's DANE_FLAG_NO_DANE_EE_NAMECHECKS: RFC 7672 §3.1.1, a DANE-EE(3) match authenticates
# the server whatever names its certificate holds (and whatever its dates).
_NO_DANE_EE_NAMECHECKS = 1

_CTX_OFFSET = object.__basicsize__  # PySSLContext: PyObject_HEAD, then SSL_CTX *ctx
_SSL_OFFSET = object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)  # PySSLSocket: ..., Socket, SSL *ssl


class DaneUnavailable(Exception):
    """This Python or OpenSSL cannot do DANE; the caller must not deliver unauthenticated."""


def _library():
    if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
        return None  # another object layout (PyPy, a debug build's bigger header)
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # the module's own libssl
        functions = {
            "SSL_CTX_dane_enable": ([ctypes.c_void_p], ctypes.c_int),
            "SSL_dane_enable": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int),
            "SSL_dane_set_flags": ([ctypes.c_void_p, ctypes.c_ulong], ctypes.c_ulong),
            "SSL_dane_tlsa_add": ([ctypes.c_void_p, ctypes.c_uint8, ctypes.c_uint8, ctypes.c_uint8,
                                   ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int),
            "SSL_add1_host": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int),
            "SSL_get_SSL_CTX": ([ctypes.c_void_p], ctypes.c_void_p),
            "SSL_get0_dane_tlsa": ([ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_uint8)] * 3
                                   + [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
        }
        for name, (argtypes, restype) in functions.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
    except (OSError, AttributeError):
        return None  # no such library, or an OpenSSL without DANE (before 1.1.0, LibreSSL)
    return lib


_LIB = _library()


def available() -> bool:
    return _LIB is not None


def _pointer_at(obj: object, offset: int) -> int:
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client context ready for DANE: TLS 1.2 or later, the chain checked by OpenSSL against
    the TLSA records given per connection (prepare()), Python's own host name check off (the
    names are OpenSSL's to check, and only for DANE-TA)."""
    if _LIB is None:
        raise DaneUnavailable("this Python's ssl module and OpenSSL cannot check TLSA records")
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if _LIB.SSL_CTX_dane_enable(_pointer_at(context, _CTX_OFFSET)) <= 0:
        raise DaneUnavailable("OpenSSL refused to enable DANE on the context")
    return context


def prepare(sock: ssl.SSLSocket, context: ssl.SSLContext, base_domain: str, names: Sequence[str],
            records: Sequence[Tlsa]) -> int:
    """Before the handshake of sock (wrapped from context, do_handshake_on_connect=False): the
    TLSA records it must match, the names a DANE-TA chain's leaf must carry (RFC 7672 §3.2.2:
    the TLSA base domain, and the MX host name it was reached by).  Returns how many records
    OpenSSL took as usable; DaneUnavailable when the objects are not what was expected."""
    assert _LIB is not None, "client_context() made the context"
    ssl_pointer = _pointer_at(sock._sslobj, _SSL_OFFSET)  # type: ignore[attr-defined]
    if not ssl_pointer or _LIB.SSL_get_SSL_CTX(ssl_pointer) != _pointer_at(context, _CTX_OFFSET):
        raise DaneUnavailable("unexpected layout of Python's ssl objects")
    if _LIB.SSL_dane_enable(ssl_pointer, base_domain.rstrip(".").encode("ascii")) <= 0:
        raise DaneUnavailable("OpenSSL refused to enable DANE on the connection")
    _LIB.SSL_dane_set_flags(ssl_pointer, _NO_DANE_EE_NAMECHECKS)
    for name in names:
        if name.rstrip(".").lower() != base_domain.rstrip(".").lower():
            _LIB.SSL_add1_host(ssl_pointer, name.rstrip(".").encode("ascii"))
    taken = 0
    for r in records:
        # > 0 taken, 0 unusable (ignored, RFC 7671 §4.1), < 0 an error: malformed data.
        if _LIB.SSL_dane_tlsa_add(ssl_pointer, r.usage, r.selector, r.mtype, r.data, len(r.data)) > 0:
            taken += 1
    return taken


def matched(sock: ssl.SSLSocket) -> tuple[int, int, int] | None:
    """After the handshake: (usage, selector, matching type) of the record that matched."""
    assert _LIB is not None
    ssl_pointer = _pointer_at(sock._sslobj, _SSL_OFFSET)  # type: ignore[attr-defined]
    usage, selector, mtype = ctypes.c_uint8(), ctypes.c_uint8(), ctypes.c_uint8()
    depth = _LIB.SSL_get0_dane_tlsa(ssl_pointer, ctypes.byref(usage), ctypes.byref(selector),
                                    ctypes.byref(mtype), None, None)
    return (usage.value, selector.value, mtype.value) if depth >= 0 else None
