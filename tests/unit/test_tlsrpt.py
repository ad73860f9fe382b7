"""TLS reporting's pure part (RFC 8460): the record, the tally and its file, the report and
the mail that carries it."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from datetime import UTC, datetime

import pytest

from nsmail.core import tlsrpt
from nsmail.core.tlsrpt import Detail, Policy, Tally

STS = Policy("rcpt.test", "sts", ("version: STSv1", "mode: enforce"), ("mx.rcpt.test",))
TLSA = Policy("other.test", "tlsa", ("3 1 1 abcd",))
MISMATCH = Detail(tlsrpt.CERTIFICATE_HOST_MISMATCH, "198.51.100.70", "mx.rcpt.test", "203.0.113.25")


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=TLSRPTv1; rua=mailto:tls@rcpt.test"], ("tls@rcpt.test",)),
        (
            ["v=TLSRPTv1;rua=mailto:a@rcpt.test,https://r.test/x,mailto:b@r.test"],
            ("a@rcpt.test", "b@r.test"),
        ),
        (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@rcpt.test"], ("a@rcpt.test",)),
        (["v=TLSRPTv1; rua=mailto:a@rcpt.test", "v=TLSRPTv1; rua=mailto:b@rcpt.test"], None),
        (["v=TLSRPTv1;"], None),  # no rua
        ([], None),
    ],
)
def test_the_record(texts: list[str], expected: tuple[str, ...] | None) -> None:
    assert tlsrpt.parse_record(texts) == expected


def tally() -> Tally:
    counted = Tally("2026-06-01")
    for _ in range(3):
        counted.add(STS, None)
    counted.add(STS, MISMATCH)
    counted.add(STS, MISMATCH)
    counted.add(TLSA, None)
    return counted


def test_the_tally_survives_its_file_and_refuses_what_it_did_not_write() -> None:
    counted = tally()
    assert tlsrpt.load(tlsrpt.dump(counted)) == counted
    for data in (b"", b"{}", b'{"day": "soon", "policies": []}', b"\xff"):
        assert tlsrpt.load(data) is None
    forged = tlsrpt.dump(counted).replace(b"certificate-host-mismatch", b"all-fine")
    assert tlsrpt.load(forged) is None


def test_the_report_of_one_domain() -> None:
    document = json.loads(
        tlsrpt.report(
            tally(),
            "rcpt.test",
            organization="bcd.test",
            contact="postmaster@bcd.test",
            report_id="r1",
        )
    )
    assert document["date-range"] == {
        "start-datetime": "2026-06-01T00:00:00Z",
        "end-datetime": "2026-06-01T23:59:59Z",
    }
    (policy,) = document["policies"]
    assert policy["policy"] == {
        "policy-type": "sts",
        "policy-domain": "rcpt.test",
        "policy-string": ["version: STSv1", "mode: enforce"],
        "mx-host": ["mx.rcpt.test"],
    }
    assert policy["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 2,
    }
    assert policy["failure-details"] == [
        {
            "result-type": "certificate-host-mismatch",
            "sending-mta-ip": "198.51.100.70",
            "receiving-mx-hostname": "mx.rcpt.test",
            "receiving-ip": "203.0.113.25",
            "failed-session-count": 2,
        }
    ]


def test_the_mail_carries_the_report_gzipped() -> None:
    document = tlsrpt.report(
        tally(), "rcpt.test", organization="bcd.test", contact="c", report_id="r1"
    )
    raw = tlsrpt.message(
        document,
        domain="rcpt.test",
        submitter="bcd.test",
        sender="postmaster@bcd.test",
        recipients=["tls@rcpt.test"],
        report_id="r1",
        day="2026-06-01",
        now=datetime(2026, 6, 2, tzinfo=UTC),
        unique="q1",
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert (
        parsed["TLS-Report-Domain"] == "rcpt.test" and parsed["TLS-Report-Submitter"] == "bcd.test"
    )
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    attachment = next(
        p for p in parsed.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"
    )
    assert gzip.decompress(attachment.get_content()) == document
    assert attachment.get_filename() == "bcd.test!rcpt.test!2026-06-01!r1.json.gz"
