"""The receivers' TLS policies end to end: the real supervisor and jailed workers, a real
Postfix MX with the certificate each test gives it (or no STARTTLS at all), NSD serving
DNSSEC-signed zones, Unbound validating them on the hosting machine's loopback, and an
HTTPS server of MTA-STS policies with a lab CA. For DANE and MTA-STS: a pass, a fail,
and the downgrades an attacker tries (STARTTLS stripped, a wrong certificate, a TLSA
mismatch, the policy fetch failing, an unsigned answer carrying a forged AD): nothing is
sent in clear or to the wrong server where a policy forbids it, and nothing is lost."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosting import DUAL, Hosting, dns_records
from lab import DNS_V4, MX_V4, Lab, Nsd, Postfix, Unbound
from pki import Issued, Pki
from policy_server import publish
from polling import wait_for

SUPPORT = Path(__file__).parents[1] / "support"
POLICY = "version: STSv1\nmode: enforce\nmx: mx.test\nmax_age: 86400\n"
SEND = ["-i", "-f", "alice@bcd.test", "x@rcpt.test"]
MESSAGE = b"Subject: over TLS\n\nhello\n"

pytestmark = pytest.mark.needs("unbound", "ldns-signzone")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture
def pki(lab: Lab) -> Pki:
    return Pki(lab.tempdir("pki"))


def mx(lab: Lab, certificate: Issued | None) -> Postfix:
    return Postfix(
        lab, certificate=None if certificate is None else (certificate.cert, certificate.key)
    )


def attempt(hosting: Hosting, status: str) -> str:
    """The log line of bcd.test's attempt for x@rcpt.test that came to `status`."""
    pattern = re.compile(rf"tenant=bcd\.test .*to=<x@rcpt\.test> .*status={status} .*")
    deadline = time.monotonic() + 30
    while not (found := pattern.search(hosting.log())):
        assert time.monotonic() < deadline, f"no {status} attempt in\n{hosting.log()}"
        time.sleep(0.1)
    return found.group(0)


def tls_failures(hosting: Hosting, policy: str) -> int:
    return int((hosting.status()[DUAL.domain]["tls_failures"] or {}).get(policy, 0))


def sent_over_tls(postfix: Postfix) -> bool:
    (message,) = postfix.wait_for(1, timeout=30)
    return "using TLS" in " ".join(str(message["Received"]).split())


# --- DANE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shown", ["named", "another", "stripped"])
def test_dane(lab: Lab, pki: Pki, shown: str) -> None:
    named = pki.impostor("mx.test")  # no CA vouches for it: only its TLSA record does
    nsd = Nsd(lab, [*dns_records((DUAL,)), ("_25._tcp.mx.test", "TLSA", named.tlsa())], signed=True)
    Unbound(lab, nsd)
    postfix = mx(lab, {"named": named, "another": pki.impostor("mx.test"), "stripped": None}[shown])
    hosting = Hosting(lab, resolvers=("127.0.0.1",))  # the validating resolver, on loopback
    hosting.write_config((DUAL,))
    hosting.start()
    hosting.sendmail(DUAL.domain, SEND, MESSAGE)
    if shown == "named":
        assert "tls=dane" in attempt(hosting, "sent")
        assert sent_over_tls(postfix)
    else:
        line = attempt(hosting, "deferred")
        assert "tls=dane" in line
        words = "matches no TLSA record" if shown == "another" else "TLS is required"
        assert words in line
        wait_for(lambda: tls_failures(hosting, "dane") >= 1)
        assert postfix.messages() == []
    assert hosting.stop() == 0


def test_an_unsigned_answer_with_a_forged_ad_is_not_believed(lab: Lab, pki: Pki) -> None:
    """The relay asks a resolver off the loopback that answers from unsigned zones and sets
    AD on everything: the attacker's TLSA record naming its own certificate is not
    believed, and the domain's MTA-STS policy then refuses that certificate."""
    attacker = pki.impostor("mx.test")
    records = [
        *dns_records((DUAL,)),
        ("_25._tcp.mx.test", "TLSA", attacker.tlsa()),
        *mta_sts_records(),
    ]
    Nsd(lab, records)  # unsigned
    started(lab, [str(SUPPORT / "forging_resolver.py"), MX_V4, DNS_V4])
    policy_server(lab, pki, POLICY)
    postfix = mx(lab, attacker)
    hosting = Hosting(lab, resolvers=(MX_V4,))
    hosting.write_config((DUAL,))
    hosting.start(ca_file=pki.ca)
    hosting.sendmail(DUAL.domain, SEND, MESSAGE)
    line = attempt(hosting, "deferred")
    assert "tls=mta-sts" in line and "certificate verify failed" in line
    assert postfix.messages() == []
    assert hosting.stop() == 0


# --- MTA-STS -------------------------------------------------------------------------------


def mta_sts_records() -> list[tuple[str, str, str]]:
    return [("_mta-sts.rcpt.test", "TXT", "v=STSv1; id=1;"), ("mta-sts.rcpt.test", "A", MX_V4)]


def policy_server(lab: Lab, pki: Pki, policy: str | None) -> subprocess.Popen[str]:
    """The HTTPS server of rcpt.test's policy on MX_V4:443 (None: it answers 404)."""
    directory = lab.tempdir("policies")
    publish(pki, directory, {"rcpt.test": policy})
    return started(lab, [str(SUPPORT / "policy_server.py"), MX_V4, "443", str(directory)])


def started(lab: Lab, script: list[str]) -> subprocess.Popen[str]:
    """A support script run in the lab's internet, once it says it is ready."""
    server = lab.popen(lab.net, [sys.executable, *script], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    lab.defer(server.stdout.close)
    assert server.stdout.readline() == "ready\n"
    return server


@pytest.mark.parametrize("shown", ["issued", "impostor", "stripped"])
def test_mta_sts_enforce(lab: Lab, pki: Pki, shown: str) -> None:
    Nsd(lab, [*dns_records((DUAL,)), *mta_sts_records()])
    policy_server(lab, pki, POLICY)
    certificates = {"issued": pki.issue("mx.test"), "impostor": pki.impostor("mx.test")}
    postfix = mx(lab, certificates.get(shown))
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start(ca_file=pki.ca)
    hosting.sendmail(DUAL.domain, SEND, MESSAGE)
    if shown == "issued":
        assert "tls=mta-sts" in attempt(hosting, "sent")
        assert sent_over_tls(postfix)
    else:
        line = attempt(hosting, "deferred")
        assert "tls=mta-sts" in line
        wait_for(lambda: tls_failures(hosting, "mta-sts") >= 1)
        assert postfix.messages() == []
    assert hosting.stop() == 0


def test_a_cached_policy_outlives_a_stripped_record_and_a_failing_fetch(lab: Lab, pki: Pki) -> None:
    nsd = Nsd(lab, [*dns_records((DUAL,)), *mta_sts_records()])
    server = policy_server(lab, pki, POLICY)
    postfix = mx(lab, pki.issue("mx.test"))
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), idle_exit=1)  # each message finds a new worker
    hosting.start(ca_file=pki.ca)
    hosting.sendmail(DUAL.domain, SEND, MESSAGE)
    assert "tls=mta-sts" in attempt(hosting, "sent")
    postfix.wait_for(1)
    # The attacker strips the record, blocks the policy server and STARTTLS.
    nsd.restart(dns_records((DUAL,)))
    server.kill()
    postfix.stop()
    stripped = mx(lab, None)
    wait_for(lambda: hosting.status()[DUAL.domain]["state"] == "asleep", timeout=30)
    hosting.sendmail(DUAL.domain, SEND, b"Subject: later\n\nhello\n")
    line = attempt(hosting, "deferred")
    assert "tls=mta-sts" in line and "TLS is required" in line
    assert stripped.messages() == []
    assert hosting.stop() == 0
