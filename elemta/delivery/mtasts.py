"""MTA-STS (RFC 8461) without I/O: the `_mta-sts` TXT record, the policy file, which MX hosts a
policy allows, and when a cached policy must be fetched again.  Fetching the policy over HTTPS
and keeping it durably are the caller's; every rule here is testable with plain data.

A policy lets a domain say "deliver to me only over TLS verified for one of these MX names"
(mode enforce), "tell me what would have failed" (testing, with TLS-RPT) or "I have withdrawn
my policy" (none).  What protects the mail is the cache: a policy once fetched is applied for
its max_age even when an attacker later hides the TXT record or the policy host (§5.1, §10).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31_557_600  # §3.2: max_age is at most about a year, in seconds
# §3.3: the policy body is small; a sender should refuse a large one rather than read it all.
MAX_POLICY_SIZE = 64 * 1024
POLICY_PATH = "/.well-known/mta-sts.txt"  # §3.3, at https://mta-sts.<domain>

_WSP = "[ \t]*"
_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")  # §3.1: no "=", ";", space or controls
_FIELD_DELIM = re.compile(f"{_WSP};{_WSP}")
_POLICY_LINE = re.compile(rf"([A-Za-z0-9_]+){_WSP}:{_WSP}(.*?){_WSP}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class PolicyError(ValueError):
    """A policy file that is not a valid STSv1 policy (§3.2); the domain has none then."""


@dataclass(frozen=True)
class Record:
    """The `_mta-sts.<domain>` TXT record (§3.1): its id changes when the policy does."""

    id: str


def parse_record(texts: Iterable[str]) -> Record | None:
    """The record among a name's TXT strings (each already joined from its character-strings),
    or None.  §3.1: strings not starting with "v=STSv1;" are not MTA-STS records; if not
    exactly one remains, or that one is not valid, the domain has no policy."""
    candidates = [t for t in texts if t.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    fields = _FIELD_DELIM.split(candidates[0].rstrip(" \t"))
    if fields and fields[-1] == "":  # a trailing ";" is allowed
        fields.pop()
    record_id = None
    for field_text in fields[1:]:
        name, sep, value = field_text.partition("=")
        if not sep:
            return None
        if name == "id":
            if record_id is not None or not _RECORD_ID.fullmatch(value):
                return None
            record_id = value
        elif not (_EXT_NAME.fullmatch(name) and _EXT_VALUE.fullmatch(value)):
            return None
    return Record(record_id) if record_id is not None else None


@dataclass(frozen=True)
class Policy:
    mode: str  # enforce, testing or none
    max_age: int  # seconds the policy may be cached and applied
    mx: tuple[str, ...]  # MX patterns: a host name, or "*." and a name (one more label)

    def allows(self, host: str) -> bool:
        """Whether an MX host matches one of the policy's patterns (§4.1).  A wildcard stands
        for exactly one leftmost label: "*.example.com" matches "mx.example.com", not
        "example.com" or "a.mx.example.com".  Names compare without case and final dot."""
        name = host.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = name.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False


def parse_policy(body: bytes) -> Policy:
    """The policy a well-known file holds (§3.2); PolicyError if it is not a valid one.

    Lines end in LF or CRLF; "key: value" each; unknown keys are ignored (they are how later
    versions extend the format).  version, mode and max_age are required, each once; mx at
    least once unless the mode is none."""
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} octets")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("policy is not ASCII text") from None
    seen: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        match = _POLICY_LINE.fullmatch(line)
        if match is None:
            raise PolicyError(f"not a policy line: {line[:60]!r}")
        key, value = match.groups()
        if key == "mx":
            mx.append(_mx_pattern(value))
        elif key in ("version", "mode", "max_age"):
            if key in seen:
                raise PolicyError(f"{key} given twice")
            seen[key] = value
    missing = [k for k in ("version", "mode", "max_age") if k not in seen]
    if missing:
        raise PolicyError(f"policy without {', '.join(missing)}")
    if seen["version"] != "STSv1":
        raise PolicyError(f"unknown policy version {seen['version'][:20]!r}")
    mode = seen["mode"]
    if mode not in MODES:
        raise PolicyError(f"unknown mode {mode[:20]!r}")
    age = seen["max_age"]
    if not (age.isascii() and age.isdigit() and len(age) <= 10 and int(age) <= MAX_AGE_LIMIT):
        raise PolicyError(f"max_age {age[:20]!r} is not 0..{MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise PolicyError(f"mode {mode} without mx")
    return Policy(mode, int(age), tuple(mx))


def _mx_pattern(value: str) -> str:
    """A valid mx value, lower-cased (§3.2: a domain name, possibly with a leading "*.")."""
    name = value.lower().rstrip(".")
    labels = name.removeprefix("*.").split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise PolicyError(f"not an mx pattern: {value[:60]!r}")
    return name


@dataclass(frozen=True)
class Cached:
    """A policy as elemta keeps it: with the record id it was fetched under and when."""

    policy: Policy
    id: str
    fetched: float  # Unix time

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age

    def valid(self, now: float) -> bool:
        return now < self.expires


def needs_fetch(cached: Cached | None, record: Record | None, now: float) -> bool:
    """Whether to fetch the policy before this delivery (§5.1, §5.2).

    With a record: when nothing valid is cached, or the record's id is not the cached one
    (the domain changed its policy), or the cached policy is past half its age (refreshed
    while it is still applied, so a policy in use never lapses).  Without a record (none, or
    DNS failed): never; a cached policy still applies until it expires (§5.1), which is what
    keeps an attacker who hides the record from turning the policy off."""
    if record is None:
        return False
    if cached is None or not cached.valid(now) or cached.id != record.id:
        return True
    return now >= cached.fetched + cached.policy.max_age / 2


def applicable(cached: Cached | None, now: float) -> Policy | None:
    """The policy to apply now: the cached one while it is valid, else none (§5.1: with no
    valid policy, deliver as though the domain had not published one)."""
    if cached is None or not cached.valid(now) or cached.policy.mode == "none":
        return None
    return cached.policy


def policy_url(domain: str) -> str:
    """Where the domain's policy is (§3.3): always this host and path, never a redirect."""
    return f"https://mta-sts.{domain.rstrip('.').lower()}{POLICY_PATH}"
