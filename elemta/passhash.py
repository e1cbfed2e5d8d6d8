"""Password hashes for the AUTH password file: scrypt (RFC 7914), salted, in the form
`$scrypt$ln=14,r=8,p=1$<salt>$<key>` with salt and key in base64.  The cost is read from each
hash, so raising SCRYPT_LN later leaves the old hashes valid.  No file handling here:
passwords.py keeps the file."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

# scrypt with N = 2**14, r = 8, p = 1: 16 MiB and 23 ms per check on one core of an AMD EPYC
# server (Debian bookworm's python3 3.11 with OpenSSL 3.0; ln=15 took 60 ms).  That is the
# price of a login, small next to a TLS handshake, and what each guess costs whoever steals
# the file.  hashlib.scrypt releases the GIL, so checks on several sessions run in parallel.
SCRYPT_LN, SCRYPT_R, SCRYPT_P = 14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
# Parameters read from the file are bounded: a line may not make one check take seconds or
# more memory than a small server has (128 * r * 2**ln bytes).
MAX_MEMORY = 256 * 1024 * 1024
MAX_LN, MAX_P = 22, 16

_HASH = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,2})\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)


def hash_password(password: str, *, ln: int = SCRYPT_LN, r: int = SCRYPT_R, p: int = SCRYPT_P,
                  salt: bytes | None = None) -> str:
    """The `$scrypt$...` form of password, with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = _scrypt(password.encode("utf-8"), salt, ln, r, p, KEY_BYTES)
    return f"$scrypt$ln={ln},r={r},p={p}${b64(salt)}${b64(key)}"


def parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    """(ln, r, p, salt, key) of a `$scrypt$...` hash; ValueError saying what is wrong."""
    found = _HASH.fullmatch(text)
    if found is None:
        raise ValueError("the hash is not $scrypt$ln=N,r=N,p=N$salt$key")
    ln, r, p = (int(found.group(i)) for i in (1, 2, 3))
    if not (1 <= ln <= MAX_LN and 1 <= r and 1 <= p <= MAX_P and 128 * r * (2**ln) <= MAX_MEMORY):
        raise ValueError(f"scrypt parameters ln={ln},r={r},p={p} are out of range")
    try:
        salt, key = unb64(found.group(4)), unb64(found.group(5))
    except (binascii.Error, ValueError):
        raise ValueError("the hash's salt or key is not base64") from None
    if len(key) < 16:
        raise ValueError("the hash's key is shorter than 16 octets")
    return ln, r, p, salt, key


def verify_hash(text: str, password: str) -> bool:
    """Whether password matches the `$scrypt$...` hash text (ValueError if it is no hash)."""
    ln, r, p, salt, key = parse_hash(text)
    return hmac.compare_digest(_scrypt(password.encode("utf-8"), salt, ln, r, p, len(key)), key)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL refuses to use more than 32 MiB unless told: give it what N and r need.
    return hashlib.scrypt(password, salt=salt, n=2**ln, r=r, p=p, dklen=length,
                          maxmem=128 * r * (2**ln + p + 2) + 1024 * 1024)
