"""SMTP TLS Reporting (RFC 8460) without I/O: the `_smtp._tls` TXT record, what a failed TLS
session counts as, the daily JSON report and the message that carries it.  Counting sessions
and sending the reports are tlsrpt_store.py's.

A domain that publishes `v=TLSRPTv1; rua=mailto:...` asks senders for one report a day (UTC)
per policy it has (DANE TLSA records, an MTA-STS policy, or none): how many TLS sessions to its
MX hosts succeeded, and how many failed, by failure type and host.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# §4.4 policy-type
TLSA, STS, NO_POLICY = "tlsa", "sts", "no-policy-found"
# §4.3 result-type: negotiation failures, then DANE's, then MTA-STS's.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

# OpenSSL's X509_V_ERR_* codes for what a certificate check found (ssl.SSLCertVerificationError).
_BY_VERIFY_CODE = {
    9: CERTIFICATE_EXPIRED,  # not yet valid: outside its validity all the same
    10: CERTIFICATE_EXPIRED,
    18: CERTIFICATE_NOT_TRUSTED, 19: CERTIFICATE_NOT_TRUSTED, 20: CERTIFICATE_NOT_TRUSTED,
    21: CERTIFICATE_NOT_TRUSTED, 27: CERTIFICATE_NOT_TRUSTED,
    62: CERTIFICATE_HOST_MISMATCH,
    65: TLSA_INVALID,  # X509_V_ERR_DANE_NO_MATCH: no TLSA record matched the chain
}

MEDIA_TYPE = "application/tlsrpt+gzip"  # §5.3
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")


def result_for_verify_code(code: int) -> str:
    return _BY_VERIFY_CODE.get(code, VALIDATION_FAILURE)


def parse_record(texts: Iterable[str]) -> tuple[str, ...]:
    """The report URIs (rua) of a domain's `_smtp._tls` TXT strings, () if it has no valid
    record.  §3: exactly one string starting "v=TLSRPTv1"; rua is a comma-separated list of
    mailto: and https: URIs (others are ignored)."""
    candidates = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if len(candidates) != 1:
        return ()
    fields = _FIELD_DELIM.split(candidates[0].strip(" \t"))
    if fields[0] != "v=TLSRPTv1":
        return ()
    rua = ""
    for text in fields[1:]:
        name, sep, value = text.partition("=")
        if name.strip() == "rua" and sep:
            rua = value
    uris = [u.strip() for u in rua.split(",") if u.strip()]
    return tuple(u for u in uris if u.lower().startswith(("mailto:", "https:")))


def mailto_addresses(uris: Sequence[str]) -> list[str]:
    """The addresses of the mailto: URIs (RFC 6068; a query part such as ?subject= is dropped)."""
    out = []
    for uri in uris:
        if uri.lower().startswith("mailto:"):
            address = uri[7:].split("?", 1)[0].strip()
            if "@" in address and not any(c in address for c in "<>\r\n ,"):
                out.append(address)
    return out


@dataclass(frozen=True)
class PolicyKey:
    """One policy a domain had (§4.4): its type, its text, and the MX hosts it names."""

    type: str
    domain: str
    string: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()


@dataclass
class PolicyCounts:
    successes: int = 0
    # (result-type, receiving MX host name, receiving IP) -> sessions
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)


def day_of(at: float) -> str:
    """The UTC day a session belongs to (§4.1: reports cover whole UTC days)."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d")


def day_range(day: str) -> tuple[float, float]:
    """The start of the day and of the next one, as Unix times."""
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    return start.timestamp(), (start + datetime.timedelta(days=1)).timestamp()


def build_report(day: str, domain: str, policies: dict[PolicyKey, PolicyCounts], *, organization: str,
                 contact: str, report_id: str) -> dict:
    """The report (§4) for one policy domain and one UTC day."""
    start, end = day_range(day)
    entries = []
    for key in sorted(policies, key=lambda k: (k.type, k.string, k.mx_host)):
        counts = policies[key]
        policy: dict = {"policy-type": key.type, "policy-domain": key.domain}
        if key.string:
            policy["policy-string"] = list(key.string)
        if key.mx_host:
            policy["mx-host"] = list(key.mx_host)
        failed = sum(counts.failures.values())
        entry: dict = {"policy": policy, "summary": {"total-successful-session-count": counts.successes,
                                                     "total-failure-session-count": failed}}
        if counts.failures:
            details = []
            for (result, mx, ip), n in sorted(counts.failures.items()):
                detail: dict = {"result-type": result, "failed-session-count": n}
                if mx:
                    detail["receiving-mx-hostname"] = mx
                if ip:
                    detail["receiving-ip"] = ip
                details.append(detail)
            entry["failure-details"] = details
        entries.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _rfc3339(start), "end-datetime": _rfc3339(end - 1)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": entries,
    }


def _rfc3339(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def filename(submitter: str, domain: str, day: str, report_id: str) -> str:
    """§5.3: receiver!policy-domain!begin!end!unique-id.json.gz (begin and end in Unix time)."""
    start, end = day_range(day)
    unique = re.sub(r"[^A-Za-z0-9.-]", "", report_id.split("@")[0])[:32]
    return f"{submitter}!{domain}!{int(start)}!{int(end) - 1}!{unique}.json.gz"


def compressed(report: dict) -> bytes:
    """The report as gzipped JSON (§5.3: application/tlsrpt+gzip), the same bytes every time."""
    return gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)


def build_message(report: dict, *, domain: str, day: str, submitter: str, sender: str, to: Sequence[str],
                  now: float) -> bytes:
    """The report as a message (§5.3): multipart/report with report-type "tlsrpt", a short
    text part and the gzipped JSON, with the TLS-Report-Domain and TLS-Report-Submitter
    fields that let the recipient file it (and elemta not count its own deliveries)."""
    report_id = report["report-id"]
    encoded = base64.encodebytes(compressed(report)).replace(b"\n", b"\r\n")
    boundary = f"tlsrpt-{report_id.split('@')[0]}"
    name = filename(submitter, domain, day, report_id)
    text = (f"This is a TLS report (RFC 8460) from {submitter} for {domain},\r\n"
            f"covering {day} (UTC).  The report is attached as {name}.\r\n")
    head = (
        f"From: {sender}\r\n"
        f"To: {', '.join(to)}\r\n"
        f"Date: {email.utils.formatdate(now)}\r\n"
        f"Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>\r\n"
        f"Message-ID: <{report_id}>\r\n"
        f"TLS-Report-Domain: {domain}\r\n"
        f"TLS-Report-Submitter: {submitter}\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"\r\n'
    )
    parts = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{text}\r\n"
        f"--{boundary}\r\nContent-Type: {MEDIA_TYPE}\r\nContent-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'
    ).encode() + encoded + f"\r\n--{boundary}--\r\n".encode()
    return head.encode() + b"\r\n" + parts


def is_report(body: bytes) -> bool:
    """Whether a message is a TLS report (its header has TLS-Report-Domain): its own delivery
    is not counted, so reports never beget reports."""
    end = body.find(b"\r\n\r\n")
    head = body[: end if end >= 0 else len(body)].lower()
    return head.startswith(b"tls-report-domain:") or b"\ntls-report-domain:" in head
