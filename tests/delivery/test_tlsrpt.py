"""TLS reports (RFC 8460) without I/O: the record, the report and the message that carries it."""

import email
import email.policy
import gzip
import json
import re

import pytest

from elemta.delivery import tlsrpt
from elemta.delivery.tlsrpt import PolicyCounts, PolicyKey


@pytest.mark.parametrize(("texts", "expected"), [
    (["v=TLSRPTv1; rua=mailto:tls@example.com"], ("mailto:tls@example.com",)),
    (["v=TLSRPTv1;rua=mailto:a@example.com,https://r.example.com/v1"], ("mailto:a@example.com",
                                                                       "https://r.example.com/v1")),
    (["v=TLSRPTv1; rua=mailto:a@example.com, ftp://x.example;"], ("mailto:a@example.com",)),  # unknown scheme
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.com"], ("mailto:a@example.com",)),
    (["v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"], ()),  # two: none (§3)
    (["v=TLSRPTv2; rua=mailto:a@example.com"], ()),
    (["v=TLSRPTv1"], ()),
    ([], ()),
])
def test_the_record_gives_its_report_uris(texts, expected):
    assert tlsrpt.parse_record(texts) == expected


def test_mailto_uris_give_plain_addresses():
    assert tlsrpt.mailto_addresses(["mailto:tls@example.com?subject=x", "https://r.example/v1", "mailto:bad",
                                    "MAILTO:Ops@Example.com"]) == ["tls@example.com", "Ops@Example.com"]


@pytest.mark.parametrize(("code", "result"), [
    (10, "certificate-expired"), (62, "certificate-host-mismatch"), (20, "certificate-not-trusted"),
    (18, "certificate-not-trusted"), (65, "tlsa-invalid"), (999, "validation-failure"),
])
def test_openssl_verify_codes_map_to_result_types(code, result):
    assert tlsrpt.result_for_verify_code(code) == result


STS = PolicyKey("sts", "example.com", ("version: STSv1", "mode: enforce", "mx: *.mail.example.com",
                                       "max_age: 86400"), ("*.mail.example.com",))
TLSA = PolicyKey("tlsa", "example.com", ("3 1 1 " + "ab" * 32,), ("mx.example.com",))


def sample_report():
    sts = PolicyCounts(5326, {("certificate-expired", "mx1.mail.example.com", "192.0.2.1"): 100,
                              ("starttls-not-supported", "mx2.mail.example.com", ""): 200})
    return tlsrpt.build_report("2026-12-04", "example.com", {STS: sts, TLSA: PolicyCounts(7)},
                               organization="relay.example.org", contact="postmaster@relay.example.org",
                               report_id="0ABC@relay.example.org")


def check_schema(report: dict) -> None:
    """RFC 8460 §4.4 (the JSON report schema): the fields, their types and the rules between them."""
    assert set(report) <= {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    for name in ("organization-name", "contact-info", "report-id"):
        assert isinstance(report[name], str) and report[name]
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
    assert stamp.fullmatch(report["date-range"]["start-datetime"])
    assert stamp.fullmatch(report["date-range"]["end-datetime"])
    for entry in report["policies"]:
        policy = entry["policy"]
        assert policy["policy-type"] in ("tlsa", "sts", "no-policy-found")
        assert isinstance(policy["policy-domain"], str)
        for name in ("policy-string", "mx-host"):
            assert all(isinstance(s, str) for s in policy.get(name, []))
        summary = entry["summary"]
        assert set(summary) == {"total-successful-session-count", "total-failure-session-count"}
        details = entry.get("failure-details", [])
        assert summary["total-failure-session-count"] == sum(d["failed-session-count"] for d in details)
        for detail in details:
            assert detail["result-type"] in (
                "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
            assert isinstance(detail["failed-session-count"], int) and detail["failed-session-count"] > 0


def test_the_report_follows_the_schema_with_the_counts():
    report = sample_report()
    check_schema(report)
    assert report["date-range"] == {"start-datetime": "2026-12-04T00:00:00Z", "end-datetime": "2026-12-04T23:59:59Z"}
    sts, tlsa = report["policies"]
    assert sts["policy"] == {"policy-type": "sts", "policy-domain": "example.com", "policy-string": list(STS.string),
                             "mx-host": ["*.mail.example.com"]}
    assert sts["summary"] == {"total-successful-session-count": 5326, "total-failure-session-count": 300}
    assert sts["failure-details"][0] == {"result-type": "certificate-expired", "failed-session-count": 100,
                                         "receiving-mx-hostname": "mx1.mail.example.com", "receiving-ip": "192.0.2.1"}
    assert tlsa["summary"]["total-failure-session-count"] == 0 and "failure-details" not in tlsa


def test_the_message_is_a_multipart_report_with_the_gzipped_json():
    report = sample_report()
    raw = tlsrpt.build_message(report, domain="example.com", day="2026-12-04", submitter="relay.example.org",
                               sender="postmaster@relay.example.org", to=["tls@example.com"], now=1.8e9)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "example.com" and msg["TLS-Report-Submitter"] == "relay.example.org"
    assert msg["Subject"] == "Report Domain: example.com Submitter: relay.example.org Report-ID: <0ABC@relay.example.org>"
    text, attached = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert attached.get_content_type() == "application/tlsrpt+gzip"
    assert attached.get_filename() == "relay.example.org!example.com!1796342400!1796428799!0ABC.json.gz"
    assert json.loads(gzip.decompress(attached.get_content())) == report
    assert all(len(line) <= 998 for line in raw.split(b"\r\n")) and b"\n" not in raw.replace(b"\r\n", b"")
    assert tlsrpt.is_report(raw) and not tlsrpt.is_report(b"Subject: TLS-Report-Domain: x\r\n\r\nTLS-Report-Domain: y")


def test_a_session_belongs_to_its_utc_day():
    assert tlsrpt.day_of(1796342400.0) == "2026-12-04" and tlsrpt.day_of(1796342399.0) == "2026-12-03"
    assert tlsrpt.day_range("2026-12-04") == (1796342400.0, 1796428800.0)
