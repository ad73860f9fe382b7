"""SMTP delivery against a real aiosmtpd server on loopback, DNS through the real relay."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
import smtp_servers
from dns_servers import DNSStack, dns_stack
from engine_harness import Harness
from loopback_tenant import ZONE, make_tenant
from smtp_servers import Recorder, free_port

from nsmail.core.config import DeliveryConfig, SmtpTimeouts, Tenant
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Envelope

SELF_SIGNED = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1"
SELF_SIGNED_NAME = ("-subj", "/CN=mx.rcpt.test", "-addext", "subjectAltName=DNS:mx.rcpt.test")
BODY = Message.of(b"Subject: test\n\nhello\n.leading dot\n")


_agents: list[Harness] = []


@contextlib.contextmanager
def smtp_server(recorder: Recorder, **kwargs: Any) -> Iterator[int]:
    """The recording server (see smtp_servers.smtp_server); yields its port."""
    with smtp_servers.smtp_server(recorder, **kwargs) as port:
        try:
            yield port
        finally:
            # Engines keep sessions open between messages: end them before the server goes.
            while _agents:
                _agents.pop().close()


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSStack]:
    with dns_stack(ZONE) as stack:
        yield stack


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def port(recorder: Recorder) -> Iterator[int]:
    with smtp_server(recorder) as p:
        yield p


def agent(
    dns: DNSStack,
    port: int,
    tenant: Tenant,
    tls_verified: ssl.SSLContext | None = None,
    **config: Any,
) -> Harness:
    """The delivery engine of `tenant`, its mail for `port` of the zone's mail hosts."""
    made = Harness(
        tenant,
        DeliveryConfig(**{"port": port, "timeout": 5, **config}),
        dns.resolver(),
        verifying=tls_verified,
    )
    _agents.append(made)
    return made


def by_recipient(outcomes: list[Outcome]) -> dict[str, tuple[Status, int | None]]:
    return {o.recipient: (o.status, o.code) for o in outcomes}


def test_delivers_from_the_tenant_address_and_name(
    dns: DNSStack, port: int, recorder: Recorder, tmp_path: Path
) -> None:
    dns.server.queries.clear()
    envelope = Envelope("alice@tenant.test", ("a@rcpt.test", "b@RCPT.test"))
    outcomes = agent(dns, port, make_tenant(tmp_path)).deliver("q1", envelope, BODY)
    assert [(o.status, o.code) for o in outcomes] == [(Status.DELIVERED, 250)] * 2
    assert outcomes[0].relay == f"mx.rcpt.test[127.0.0.1]:{port}"
    [message] = recorder.received  # one connection, one transaction for the domain
    assert message.sender == "alice@tenant.test"
    assert message.recipients == ["a@rcpt.test", "b@RCPT.test"]
    assert message.peer == "127.0.0.5"
    assert message.ehlo == "mail.tenant.test"
    assert message.content == b"Subject: test\r\n\r\nhello\r\n.leading dot\r\n"
    # The tenant has no IPv6 address: no AAAA lookups.
    assert all(rdtype != "AAAA" for _, rdtype, _ in dns.server.queries)


def test_outcome_per_recipient(
    dns: DNSStack, port: int, recorder: Recorder, tmp_path: Path
) -> None:
    recorder.rcpt_replies = {"later": "451 4.3.0 try later", "nobody": "550 5.1.1 no such user"}
    envelope = Envelope("", ("ok@rcpt.test", "later@rcpt.test", "nobody@rcpt.test", "bad"))
    outcomes = agent(dns, port, make_tenant(tmp_path)).deliver("q2", envelope, BODY)
    assert by_recipient(outcomes) == {
        "ok@rcpt.test": (Status.DELIVERED, 250),
        "later@rcpt.test": (Status.TEMPORARY, 451),
        "nobody@rcpt.test": (Status.PERMANENT, 550),
        "bad": (Status.PERMANENT, None),
    }
    assert "no such user" in outcomes[2].text
    assert [m.recipients for m in recorder.received] == [["ok@rcpt.test"]]
    assert recorder.received[0].sender == "<>"  # the null reverse-path


def test_data_rejection_applies_to_accepted_recipients(
    dns: DNSStack, port: int, recorder: Recorder, tmp_path: Path
) -> None:
    recorder.data_reply = "554 5.7.1 spam"
    outcomes = agent(dns, port, make_tenant(tmp_path)).deliver(
        "q3", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY
    )
    assert by_recipient(outcomes) == {"a@rcpt.test": (Status.PERMANENT, 554)}
    recorder.data_reply = "452 4.3.1 full"
    outcomes = agent(dns, port, make_tenant(tmp_path)).deliver(
        "q4", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY
    )
    assert by_recipient(outcomes) == {"a@rcpt.test": (Status.TEMPORARY, 452)}


def test_routing_outcomes(dns: DNSStack, port: int, recorder: Recorder, tmp_path: Path) -> None:
    recipients = (
        "x@backup.test",  # first MX refuses connections: the second one takes it
        "x@implicit.test",  # no MX: the domain's own address
        "x@nullmx.test",
        "x@noaddr.test",
        "x@nowhere.test",
    )
    outcomes = agent(dns, port, make_tenant(tmp_path)).deliver(
        "q5", Envelope("alice@tenant.test", recipients), BODY
    )
    assert by_recipient(outcomes) == {
        "x@backup.test": (Status.DELIVERED, 250),
        "x@implicit.test": (Status.DELIVERED, 250),
        "x@nullmx.test": (Status.PERMANENT, None),
        "x@noaddr.test": (Status.PERMANENT, None),
        "x@nowhere.test": (Status.PERMANENT, None),
    }
    assert outcomes[0].relay == f"mx.rcpt.test[127.0.0.1]:{port}"
    assert outcomes[1].relay == f"implicit.test[127.0.0.1]:{port}"
    assert "null MX" in outcomes[2].text


def test_unreachable_and_dns_failures_are_temporary(dns: DNSStack, tmp_path: Path) -> None:
    closed = free_port()
    outcomes = agent(dns, closed, make_tenant(tmp_path)).deliver(
        "q6", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY
    )
    assert by_recipient(outcomes) == {"a@rcpt.test": (Status.TEMPORARY, None)}
    # Words, not `ConnectionRefusedError: [Errno 111]`.
    assert outcomes[0].text == f"4.4.1 mx.rcpt.test[127.0.0.1]:{closed}: connection refused"
    with dns_stack(ZONE, resolvers=(IPv4Address("127.0.0.2"),), timeout=0.2) as broken:
        outcomes = agent(broken, closed, make_tenant(tmp_path)).deliver(
            "q7", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY
        )
    assert by_recipient(outcomes) == {"a@rcpt.test": (Status.TEMPORARY, None)}


def test_a_server_that_never_greets_times_out_in_words(dns: DNSStack, tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever says 220
        port = silent.getsockname()[1]
        quick = SmtpTimeouts(helo=0.5)
        (outcome,) = agent(dns, port, make_tenant(tmp_path), smtp_timeouts=quick).deliver(
            "q", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY
        )
    assert (outcome.status, outcome.code) == (Status.TEMPORARY, None)
    assert outcome.text == (
        f"4.4.2 mx.rcpt.test[127.0.0.1]:{port}: timed out after 0.5 s waiting for the greeting"
    )


def test_ipv6_is_preferred_when_the_tenant_has_both(
    dns: DNSStack, recorder: Recorder, tmp_path: Path
) -> None:
    tenant = make_tenant(tmp_path, ipv6=IPv6Address("::1"))
    with smtp_server(recorder, host="::1") as port6:
        outcomes = agent(dns, port6, tenant).deliver(
            "q8", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY
        )
    assert by_recipient(outcomes) == {"a@rcpt.test": (Status.DELIVERED, 250)}
    assert outcomes[0].relay == f"mx.rcpt.test[::1]:{port6}"
    assert recorder.received[0].peer == "::1"


def test_starttls_when_offered(dns: DNSStack, recorder: Recorder, tmp_path: Path) -> None:
    server_tls, _ = self_signed(tmp_path)
    with smtp_server(recorder, tls_context=server_tls) as port:
        outcomes = agent(dns, port, make_tenant(tmp_path)).deliver(
            "q9", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY
        )
    assert by_recipient(outcomes) == {"a@rcpt.test": (Status.DELIVERED, 250)}, outcomes
    assert recorder.received[0].tls


def self_signed(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for mx.rcpt.test and the certificate file that vouches for it."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [*SELF_SIGNED.split(), *SELF_SIGNED_NAME, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    return server_tls, cert


@pytest.mark.parametrize(
    ("policy", "trusted", "offered", "expected"),
    [
        ("verify", False, True, Status.TEMPORARY),  # certificate not trusted: no plain text
        ("verify", True, True, Status.DELIVERED),
        ("verify", True, False, Status.TEMPORARY),  # STARTTLS not offered at all
        ("may", False, False, Status.DELIVERED),
    ],
)
def test_tls_policy(
    dns: DNSStack,
    recorder: Recorder,
    tmp_path: Path,
    policy: str,
    trusted: bool,
    offered: bool,
    expected: Status,
) -> None:
    server_tls, cert = self_signed(tmp_path)
    verifying = ssl.create_default_context(cafile=str(cert) if trusted else None)
    server = {"tls_context": server_tls} if offered else {}
    with smtp_server(recorder, **server) as port:
        delivering = agent(dns, port, make_tenant(tmp_path), tls_verified=verifying, tls=policy)
        (outcome,) = delivering.deliver("q", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY)
    assert outcome.status == expected, outcome
    assert bool(recorder.received) == (expected == Status.DELIVERED)
    if (policy, trusted, offered) == ("verify", False, True):
        assert outcome.text.endswith(
            ": TLS handshake failed: certificate verify failed: self-signed certificate"
        )
    if expected == Status.DELIVERED and policy == "verify":
        assert recorder.received[0].tls


def test_a_destination_listed_for_verification_demands_tls(
    dns: DNSStack, recorder: Recorder, tmp_path: Path
) -> None:
    with smtp_server(recorder) as port:
        delivering = agent(dns, port, make_tenant(tmp_path), tls_verify=("rcpt.test",))
        (outcome,) = delivering.deliver("q", Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY)
    assert outcome.status == Status.TEMPORARY and "TLS is required" in outcome.text
    assert recorder.received == []


def test_too_large_for_the_server_bounces_without_data(
    dns: DNSStack, recorder: Recorder, tmp_path: Path
) -> None:
    with smtp_server(recorder, data_size_limit=100) as port:
        big = Message.of(b"Subject: big\n\n" + b"x" * 500 + b"\n")
        (outcome,) = agent(dns, port, make_tenant(tmp_path)).deliver(
            "q", Envelope("alice@tenant.test", ("a@rcpt.test",)), big
        )
    # nsmail's own decision from the server's SIZE (RFC 1870 6.1): no reply, no code.
    assert (outcome.status, outcome.code) == (Status.PERMANENT, None)
    relay = f"mx.rcpt.test[127.0.0.1]:{port}"
    assert outcome.text.startswith(f"5.3.4 {relay}: message size ")
    assert outcome.relay == relay
    assert recorder.rcpt_attempts == []


def test_an_address_needing_smtputf8_is_refused_by_nsmail_not_the_server(
    dns: DNSStack, recorder: Recorder, tmp_path: Path
) -> None:
    with smtp_server(recorder, enable_SMTPUTF8=False) as port:
        (outcome,) = agent(dns, port, make_tenant(tmp_path)).deliver(
            "q", Envelope("alice@tenant.test", ("jörg@rcpt.test",)), BODY
        )
    # The server offers no SMTPUTF8 (RFC 6531 3.4): it was never asked, so it said nothing.
    assert (outcome.status, outcome.code) == (Status.PERMANENT, None)
    relay = f"mx.rcpt.test[127.0.0.1]:{port}"
    assert (
        outcome.text
        == f"5.6.7 {relay}: the addresses need SMTPUTF8, which the server does not offer"
    )
    assert recorder.rcpt_attempts == []


def test_one_connection_carries_several_messages(
    dns: DNSStack, recorder: Recorder, port: int, tmp_path: Path
) -> None:
    delivering = agent(dns, port, make_tenant(tmp_path))
    for n in range(3):
        delivering.deliver(f"q{n}", Envelope("alice@tenant.test", (f"a{n}@rcpt.test",)), BODY)
    # A refused recipient leaves the session clean (RSET) for the next message.
    recorder.rcpt_replies["b"] = "550 5.1.1 no such user"
    delivering.deliver("q3", Envelope("alice@tenant.test", ("b@rcpt.test",)), BODY)
    delivering.deliver("q4", Envelope("alice@tenant.test", ("c@rcpt.test",)), BODY)
    assert len(recorder.received) == 4
    assert len({r.session for r in recorder.received}) == 1
    assert delivering.engine.sessions == 1  # kept for the next message, for now
