"""The receivers' TLS policies on loopback: the real engine, DNS through the real relay
(a validating resolver's answers, or not), aiosmtpd with the certificate a test gives it,
and a real HTTPS policy server. For each policy: it passes, it fails, and the downgrades
an attacker tries (STARTTLS stripped, a wrong certificate, a TLSA mismatch, the policy
fetch failing): nothing is sent in clear or to a server the policy forbids."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import smtp_servers
from dns_servers import dns_stack
from engine_harness import Harness
from loopback_tenant import make_tenant
from pki import Issued, Pki
from policy_server import serving
from smtp_servers import Recorder, free_port

from nsmail.core.config import DeliveryConfig
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Envelope

BODY = Message.of(b"Subject: test\n\nhello\n")
MX = "mx.rcpt.test"
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.rcpt.test\nmax_age: 86400\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def policy_server(pki: Pki, directory: Path, policy: str | None) -> Any:
    """The HTTPS server of rcpt.test's policy (none: it answers 404); yields its port."""
    return serving(pki, directory, {"rcpt.test": policy})


def zone(mx_port: int, *, mta_sts: str | None = None, tlsa: str | None = None) -> Any:
    records: dict[tuple[str, str], list[str]] = {
        ("rcpt.test.", "MX"): [f"10 {MX}."],
        (f"{MX}.", "A"): ["127.0.0.1"],
        ("mta-sts.rcpt.test.", "A"): ["127.0.0.1"],
    }
    if mta_sts is not None:
        records["_mta-sts.rcpt.test.", "TXT"] = [f'"v=STSv1; id={mta_sts};"']
    if tlsa is not None:
        records[f"_{mx_port}._tcp.{MX}.", "TLSA"] = [tlsa]
    return records


@contextlib.contextmanager
def delivering(
    tmp_path: Path,
    pki: Pki,
    records: Any,
    *,
    validating: bool = False,
    https_port: int = 0,
    mx_port: int,
    cache: Path | None = None,
) -> Iterator[Harness]:
    with dns_stack(records, validating=validating) as stack:
        harness = Harness(
            make_tenant(tmp_path),
            DeliveryConfig(port=mx_port, timeout=5),
            stack.resolver(),
            verifying=pki.client_context(),
        )
        harness.remote.policies.https_port = https_port
        harness.remote.policies.cache_dir = cache
        try:
            yield harness
        finally:
            harness.close()


def send(harness: Harness) -> Outcome:
    (outcome,) = harness.deliver("q1", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY)
    return outcome


@contextlib.contextmanager
def mx(recorder: Recorder, certificate: Issued | None, port: int) -> Iterator[None]:
    """rcpt.test's MX on `port`: STARTTLS with `certificate`, or none (stripped)."""
    tls = {} if certificate is None else {"tls_context": certificate.server_context()}
    with smtp_servers.smtp_server(recorder, port=port, **tls):
        yield


# --- MTA-STS ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("certificate", "delivered"),
    [("issued", True), ("impostor", False), ("stripped", False)],
)
def test_mta_sts_enforce(tmp_path: Path, pki: Pki, certificate: str, delivered: bool) -> None:
    recorder, mx_port = Recorder(), free_port()
    shown = {"issued": pki.issue(MX), "impostor": pki.impostor(MX), "stripped": None}
    with (
        policy_server(pki, tmp_path, ENFORCE) as https,
        mx(recorder, shown[certificate], mx_port),
        delivering(
            tmp_path, pki, zone(mx_port, mta_sts="1"), https_port=https, mx_port=mx_port
        ) as h,
    ):
        outcome = send(h)
        failures = dict(h.remote.tls_failures)
    assert outcome.tls == "mta-sts"
    if delivered:
        assert outcome.status == Status.DELIVERED and recorder.received[0].tls
        assert failures == {}
    else:
        # Deferred, never sent in clear nor to a server that cannot prove its name.
        assert outcome.status == Status.TEMPORARY and recorder.received == []
        assert recorder.rcpt_attempts == []
        assert failures == {"mta-sts": 1}
        words = "certificate verify failed" if certificate == "impostor" else "TLS is required"
        assert words in outcome.text


def test_mta_sts_enforce_never_connects_to_an_mx_its_policy_does_not_name(
    tmp_path: Path, pki: Pki
) -> None:
    recorder, mx_port = Recorder(), free_port()
    policy = ENFORCE.replace("mx.rcpt.test", "mx.elsewhere.test")
    with (
        policy_server(pki, tmp_path, policy) as https,
        mx(recorder, pki.issue(MX), mx_port),
        delivering(
            tmp_path, pki, zone(mx_port, mta_sts="1"), https_port=https, mx_port=mx_port
        ) as h,
    ):
        outcome = send(h)
    assert outcome.status == Status.TEMPORARY and outcome.tls == "mta-sts"
    assert "mx.rcpt.test is not an MX host of its MTA-STS policy" in outcome.text
    assert recorder.rcpt_attempts == [] and recorder.received == []


def test_mta_sts_testing_delivers_as_before_and_counts_the_failure(
    tmp_path: Path, pki: Pki
) -> None:
    recorder, mx_port = Recorder(), free_port()
    policy = ENFORCE.replace("enforce", "testing")
    with (
        policy_server(pki, tmp_path, policy) as https,
        mx(recorder, None, mx_port),  # STARTTLS stripped
        delivering(
            tmp_path, pki, zone(mx_port, mta_sts="1"), https_port=https, mx_port=mx_port
        ) as h,
    ):
        outcome = send(h)
        failures = dict(h.remote.tls_failures)
    assert outcome.status == Status.DELIVERED and outcome.tls == "none"
    assert failures == {"mta-sts-testing": 1}


def test_a_cached_policy_holds_when_the_record_and_the_fetch_are_taken_away(
    tmp_path: Path, pki: Pki
) -> None:
    """The attacker strips the TXT record and blocks the policy server; the policy cached
    by an earlier worker (on disk, in the tenant's spool) still forbids clear text."""
    cache = tmp_path / "mta-sts"
    recorder, mx_port = Recorder(), free_port()
    with (
        policy_server(pki, tmp_path, ENFORCE) as https,
        mx(recorder, pki.issue(MX), mx_port),
        delivering(
            tmp_path,
            pki,
            zone(mx_port, mta_sts="1"),
            https_port=https,
            mx_port=mx_port,
            cache=cache,
        ) as h,
    ):
        assert send(h).status == Status.DELIVERED
    assert (cache / "rcpt.test").exists()
    stripped = Recorder()
    with (
        mx(stripped, None, mx_port),
        delivering(
            tmp_path, pki, zone(mx_port), https_port=free_port(), mx_port=mx_port, cache=cache
        ) as h,
    ):
        outcome = send(h)
    assert outcome.status == Status.TEMPORARY and outcome.tls == "mta-sts"
    assert stripped.received == []


def test_a_policy_that_cannot_be_fetched_the_first_time_is_no_policy(
    tmp_path: Path, pki: Pki
) -> None:
    # RFC 8461 5: with no policy cached, a failed fetch means delivery as before.
    recorder, mx_port = Recorder(), free_port()
    with (
        policy_server(pki, tmp_path, None) as https,  # 404
        mx(recorder, None, mx_port),
        delivering(
            tmp_path, pki, zone(mx_port, mta_sts="1"), https_port=https, mx_port=mx_port
        ) as h,
    ):
        outcome = send(h)
    assert outcome.status == Status.DELIVERED and outcome.tls == "none"


# --- DANE --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("validating", "shown", "expected", "tls"),
    [
        # A self-signed certificate no CA vouches for, named by a validated TLSA record.
        (True, "named", Status.DELIVERED, "dane"),
        (True, "other", Status.TEMPORARY, "dane"),  # TLSA mismatch: deferred
        (True, "stripped", Status.TEMPORARY, "dane"),  # no STARTTLS: deferred
        # Not validated: the records are as good as none, opportunistic TLS goes on.
        (False, "other", Status.DELIVERED, "may"),
    ],
)
def test_dane(
    tmp_path: Path, pki: Pki, validating: bool, shown: str, expected: Status, tls: str
) -> None:
    named = pki.impostor(MX)  # DANE-EE needs no CA
    certificates = {"named": named, "other": pki.impostor(MX), "stripped": None}
    recorder, mx_port = Recorder(), free_port()
    records = zone(mx_port, tlsa=named.tlsa())
    with (
        mx(recorder, certificates[shown], mx_port),
        delivering(tmp_path, pki, records, validating=validating, mx_port=mx_port) as h,
    ):
        outcome = send(h)
        failures = dict(h.remote.tls_failures)
    assert (outcome.status, outcome.tls) == (expected, tls), outcome
    assert bool(recorder.received) == (expected == Status.DELIVERED)
    assert failures == ({} if expected == Status.DELIVERED else {"dane": 1})
    if shown == "other" and validating:
        assert "DANE: the certificate matches no TLSA record" in outcome.text


def test_dane_takes_precedence_over_mta_sts(tmp_path: Path, pki: Pki) -> None:
    # The MX shows a certificate only its TLSA record vouches for: MTA-STS would refuse it.
    named = pki.impostor(MX)
    recorder, mx_port = Recorder(), free_port()
    records = zone(mx_port, mta_sts="1", tlsa=named.tlsa())
    with (
        policy_server(pki, tmp_path, ENFORCE) as https,
        mx(recorder, named, mx_port),
        delivering(tmp_path, pki, records, validating=True, https_port=https, mx_port=mx_port) as h,
    ):
        outcome = send(h)
    assert (outcome.status, outcome.tls) == (Status.DELIVERED, "dane")
