"""TLS reports (RFC 8460) from real sessions: the engine's sessions under MTA-STS policies
are counted, the day's tally survives a new worker, and the next day one report per
policy domain that asks for one is queued, DKIM-signed, with the null sender."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import smtp_servers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dns_servers import dns_stack
from engine_harness import Harness
from loopback_tenant import make_tenant
from pki import Pki
from policy_server import serving
from smtp_servers import Recorder, free_port

from nsmail.core.config import DeliveryConfig
from nsmail.core.dkim import dns_record, signer_from_pem
from nsmail.core.message import Message
from nsmail.core.outcome import Status
from nsmail.core.queuefile import Envelope
from nsmail.tenant.spool import INCOMING, Spool
from nsmail.tenant.tlsreports import TlsReports

DAY = 1780315200.0  # 2026-06-01 12:00 UTC
POLICY = "version: STSv1\nmode: enforce\nmx: mx.rcpt.test\nmax_age: 86400\n"


class Clock:
    def __init__(self) -> None:
        self.now = DAY

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def zone(dkim_txt: str) -> dict[tuple[str, str], list[str]]:
    records: dict[tuple[str, str], list[str]] = {
        ("s1._domainkey.tenant.test.", "TXT"): [dkim_txt],
    }
    for domain in ("rcpt.test", "bad.test"):
        records[f"{domain}.", "MX"] = ["10 mx.rcpt.test."]
        records[f"mta-sts.{domain}.", "A"] = ["127.0.0.1"]
        records[f"_mta-sts.{domain}.", "TXT"] = ['"v=STSv1; id=1;"']
        records[f"_smtp._tls.{domain}.", "TXT"] = [f'"v=TLSRPTv1; rua=mailto:tls@{domain}"']
    records["mx.rcpt.test.", "A"] = ["127.0.0.1"]
    return records


@contextlib.contextmanager
def worker(
    tmp_path: Path, pki: Pki, records: object, https: int, mx_port: int, clock: Clock, pem: bytes
) -> Iterator[tuple[Harness, TlsReports]]:
    with dns_stack(records) as stack:  # type: ignore[arg-type]
        resolver = stack.resolver()
        harness = Harness(
            make_tenant(tmp_path),
            DeliveryConfig(port=mx_port, timeout=5),
            resolver,
            verifying=pki.client_context(),
        )
        signer = signer_from_pem("tenant.test", "s1", pem)
        spool = Spool(tmp_path / "spool")
        spool.create()
        reports = TlsReports(spool, "tenant.test", resolver, signer, clock)
        harness.remote.policies.https_port = https
        harness.remote.reports = reports
        try:
            yield harness, reports
        finally:
            harness.close()


def test_a_days_sessions_are_reported_the_next_day(tmp_path: Path, pki: Pki) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    record = dns_record(signer_from_pem("tenant.test", "s1", pem)).split(" IN TXT ", 1)[1]
    records = zone(record)
    clock, recorder, mx_port = Clock(), Recorder(), free_port()
    policies = {"rcpt.test": POLICY, "bad.test": POLICY.replace("mx.rcpt.test", "mx.bad.test")}
    tls = {"tls_context": pki.issue("mx.rcpt.test").server_context()}
    body = Message.of(b"Subject: test\n\nhello\n")
    with (
        serving(pki, tmp_path, policies) as https,
        smtp_servers.smtp_server(recorder, port=mx_port, **tls),
    ):
        with worker(tmp_path, pki, records, https, mx_port, clock, pem) as (harness, reports):
            sent = harness.deliver("q1", Envelope("a@tenant.test", ("x@rcpt.test",)), body)
            refused = harness.deliver("q2", Envelope("a@tenant.test", ("y@bad.test",)), body)
            assert [o.status for o in (*sent, *refused)] == [Status.DELIVERED, Status.TEMPORARY]
            reports.save()  # as the worker does when it stops
        clock.now += 86400  # the next day, another worker
        with worker(tmp_path, pki, records, https, mx_port, clock, pem) as (harness, reports):
            asyncio.run(reports.send_due())
    spool = Spool(tmp_path / "spool")
    queued = [spool.open_message(INCOMING, q) for q in spool.ids(INCOMING)]
    found = {}
    for opened in queued:
        with opened as (envelope, body, _):
            raw = body.read(0, 1 << 20)
            assert envelope.sender == ""  # as a bounce: a report makes no report
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: txt(records, name))
            (attachment,) = [p for p in parsed.iter_parts() if p.get_filename()]
            found[envelope.recipients] = json.loads(gzip.decompress(attachment.get_content()))
    assert set(found) == {("tls@rcpt.test",), ("tls@bad.test",)}
    (good,) = found["tls@rcpt.test",]["policies"]
    assert good["policy"]["policy-type"] == "sts" and good["policy"]["mx-host"] == ["mx.rcpt.test"]
    assert good["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 0,
    }
    (bad,) = found["tls@bad.test",]["policies"]
    assert bad["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    (detail,) = bad["failure-details"]
    assert detail["result-type"] == "validation-failure"
    assert detail["receiving-mx-hostname"] == "mx.rcpt.test"
    assert found["tls@bad.test",]["date-range"]["start-datetime"] == "2026-06-01T00:00:00Z"
    assert not (tmp_path / "spool" / "tlsrpt" / "2026-06-01").exists()


def txt(records: dict[tuple[str, str], list[str]], name: bytes) -> bytes:
    (value,) = records[name.decode().lower(), "TXT"]
    return "".join(value.split('"')[1::2]).encode()
