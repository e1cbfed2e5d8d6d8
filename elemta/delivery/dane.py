"""DANE TLSA records for SMTP (RFC 7672, RFC 7671) without I/O: which records are usable, and
how one is written.  The DNSSEC lookup and the TLS verification are dane_openssl.py's and the
client's.

Only DANE-TA(2) and DANE-EE(3) are usable for SMTP (RFC 7672 §3.1.3: PKIX-TA(0) and PKIX-EE(1)
assume a CA that MTAs do not share), with selector Cert(0) or SPKI(1) and matching type
Full(0), SHA2-256(1) or SHA2-512(2); a digest of the wrong length is as unusable as an unknown
number (RFC 7671 §4.1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DANE_TA, DANE_EE = 2, 3
SELECTORS = {0: "cert", 1: "spki"}
DIGEST_SIZES = {1: 32, 2: 64}  # SHA2-256, SHA2-512; matching type 0 is the full data


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in SELECTORS:
            return False
        if self.mtype == 0:
            return bool(self.data)
        return len(self.data) == DIGEST_SIZES.get(self.mtype, -1)

    def __str__(self) -> str:
        """As in a zone file and in the log: "3 1 1 <hex>"."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class DaneCheck:
    """What a connection's TLS must match (RFC 7672 §3): the usable TLSA records of the host,
    the TLSA base domain, and the names a DANE-TA chain's leaf may carry (§3.2.2)."""

    records: tuple[Tlsa, ...]
    base_domain: str
    names: tuple[str, ...] = ()


def usable(records: Iterable[Tlsa]) -> list[Tlsa]:
    """The records a client may authenticate with, in their order."""
    return [r for r in records if r.usable]


def tlsa_name(host: str, port: int = 25) -> str:
    """Where a host's TLSA records are (RFC 6698 §3; RFC 7672 §2.2.3: the MX host's name)."""
    return f"_{port}._tcp.{host.rstrip('.').lower()}"
