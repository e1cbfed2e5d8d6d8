"""DKIM key pairs: generating one, writing the private half, and the DNS record of the public half.

Used by `elemtactl dkim keygen`; the dkim plugin reads the files this writes.  Both kinds are
written as PEM PKCS#8 ("BEGIN PRIVATE KEY"), which OpenSSL, OpenDKIM and the plugin all read.
Errors are ValueError (a bad argument) or OSError (the file), with a message meant for a human.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa", "ed25519")
# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048;
# verifiers need only handle keys up to 4096 bits, so a bigger one might not verify anywhere.
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096
MAX_STRING = 255  # RFC 1035 §3.3.14: one <character-string> of a TXT record holds 255 octets

# RFC 6376 §3.1: a selector is one or more sub-domains (labels) joined by dots.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")


def generate(algorithm: str = "rsa", bits: int = 2048) -> tuple[bytes, str]:
    """A new key pair: (the private key file's content, the public key in base64 for p=).

    rsa: bits from 1024 to 4096 (RFC 8301 §3.2); ed25519 (RFC 8463) ignores bits.
    """
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa":
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"RSA key size must be a whole number of bits, not {bits!r}")
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys of {bits} bits are too short: DKIM needs at least "
                             f"{MIN_RSA_BITS} (RFC 8301 §3.2), 2048 is recommended")
        if bits > MAX_RSA_BITS:
            raise ValueError(f"RSA keys of {bits} bits are too long: receivers need only verify "
                             f"keys up to {MAX_RSA_BITS} bits (RFC 8301 §3.2)")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        # RFC 6376 §3.6.1: p= is the DER SubjectPublicKeyInfo (what `openssl rsa -pubout` gives).
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        # RFC 8463 §4.2: p= is the bare 32-octet public key, not wrapped in ASN.1.
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return private, base64.b64encode(public).decode("ascii")


def record_value(algorithm: str, public_b64: str) -> str:
    """The key record's text (RFC 6376 §3.6.1): "v=DKIM1; k=rsa; p=..."."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown key algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    try:
        raw = base64.b64decode(public_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("public key is not valid base64") from None
    if not raw:
        raise ValueError("public key is empty (an empty p= would publish a revoked key)")
    if algorithm == "ed25519" and len(raw) != 32:
        raise ValueError(f"an ed25519 public key has 32 octets, this one {len(raw)} (RFC 8463 §4.2)")
    return f"v=DKIM1; k={algorithm}; p={public_b64}"


def record_strings(algorithm: str, public_b64: str) -> list[str]:
    """The record's text cut into TXT character-strings of at most 255 octets (RFC 1035
    §3.3.14); verifiers join them back without a separator (RFC 6376 §3.6.2.2)."""
    value = record_value(algorithm, public_b64)
    return [value[i:i + MAX_STRING] for i in range(0, len(value), MAX_STRING)]


def record_name(domain: str, selector: str) -> str:
    """Where the key is published: <selector>._domainkey.<domain> (RFC 6376 §3.6.2.1)."""
    domain = domain.strip().rstrip(".").lower()
    if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
        raise ValueError(f"{domain!r} is not a domain name (ASCII labels, at least two)")
    if not _SELECTOR.fullmatch(selector):
        raise ValueError(f"selector {selector!r} must be DNS labels of letters, digits and "
                         "hyphens, joined by dots (RFC 6376 §3.1)")
    name = f"{selector}._domainkey.{domain}"
    if len(name) > 253:
        raise ValueError(f"{name!r} is too long for a DNS name (RFC 1035 §2.3.4)")
    return name


def txt_record(domain: str, selector: str, algorithm: str, public_b64: str) -> str:
    """A zone file line publishing the key:
    <selector>._domainkey.<domain>. IN TXT ( "v=DKIM1; k=rsa; p=..." "..." )"""
    name = record_name(domain, selector)
    strings = " ".join(f'"{s}"' for s in record_strings(algorithm, public_b64))
    return f"{name}. IN TXT ( {strings} )"


def write_key(path: str | os.PathLike, data: bytes, group: int | None = None) -> None:
    """Create path holding data, readable by its owner only (mode 0600), or by its owner and
    group (0640) when group (a GID, the service's) is given: the daemon reads it through it.

    FileExistsError if path exists (an old key is never overwritten: it may still sign
    mail in flight or be the only copy); other OSErrors as the system gives them.
    """
    if not isinstance(data, bytes) or not data:
        raise ValueError("key data must be non-empty bytes")
    try:
        # O_EXCL: refuse an existing file, and a symlink planted at path (never followed).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "key file already exists, not overwriting it",
                              os.fspath(path)) from None
    try:
        # The umask can only take bits away; set the mode exactly whatever it is.
        if group is not None:
            os.fchown(fd, -1, group)
        os.fchmod(fd, 0o600 if group is None else 0o640)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)  # no half-written key left behind
        raise
    os.close(fd)
