"""Hostile SMTP replies, fuzzed: the real delivery engine against a scripted server on loopback.

Hypothesis draws, per step of the session, what the server answers: right and wrong codes,
multi-line replies with mixed codes, over-long lines, NUL and 8-bit text, early closes,
EHLO extensions with hostile values, STARTTLS advertised but broken. The server keeps a
transcript; the oracle reads only the transcript, never the client's guesses, so a client
that misattributes a reply (reads a stale line as the answer to its next command) fails.
DNS goes through the real relay (`dns_servers.dns_stack`), all on 127.0.0.0/8. The server,
the strategies and the oracle are `scripted_smtp`'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dns_servers import DNSStack, dns_stack
from engine_harness import Harness
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from loopback_tenant import ZONE, make_tenant
from scripted_smtp import (
    MESSAGE,
    MESSAGES,
    SCRIPTS,
    SILENT_OR_ENDLESS,
    Reply,
    ScriptedServer,
    check,
    harmless,
    timeouts,
    tls_contexts,
)

from nsmail.core.config import DeliveryConfig
from nsmail.core.outcome import Status
from nsmail.core.queuefile import Envelope
from nsmail.core.report import LATENCY_BOUNDS, MAX_REPORT, MAX_TEXT, OUTCOMES, QUEUE_STATES, Report
from nsmail.core.report import decode as decode_report
from nsmail.core.report import encode as encode_report

# --- fixtures and tests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSStack]:
    with dns_stack(ZONE) as stack:
        yield stack


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    made = ScriptedServer()
    try:
        yield made
    finally:
        made.close()


def make_agent(dns: DNSStack, port: int, home: Path, timeout: float) -> Harness:
    config = DeliveryConfig(port=port, timeout=timeout, smtp_timeouts=timeouts(timeout))
    return Harness(make_tenant(home), config, dns.resolver(), verifying=tls_contexts()[1])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=SCRIPTS, messages=MESSAGES)
# A reply to DATA that is not 354 must not pass for the reply to the dot.
@example(script={"DATA": [Reply(b"250 2.0.0 ok\r\n")]}, messages=[1])
# A broken line inside a multi-line reply leaves the rest for the next command: a kept
# session must not carry that offset into the next message.
@example(script={"DOT": [Reply(b"250-ok\r\nzz\r\n250 ok\r\n")]}, messages=[1, 1])
@example(script={"RCPT": [Reply(b"252 2.1.5 cannot verify, will try\r\n")]}, messages=[1])
@example(script={"EHLO": [Reply(b"250-mx\r\n250 SIZE \xb2\r\n")]}, messages=[1])
@example(script={"EHLO": [Reply(b"250-mx\r\n250 SIZE " + b"9" * 5000 + b"\r\n")]}, messages=[1])
def test_hostile_replies_give_one_defined_outcome_per_recipient(
    dns: DNSStack,
    server: ScriptedServer,
    tmp_path: Path,
    script: dict[str, list[Reply]],
    messages: list[int],
) -> None:
    server.reset(script)
    agent = make_agent(dns, server.port, tmp_path, timeout=2.0)
    results = []
    try:
        for m, count in enumerate(messages):
            sender = f"s{m}@tenant.test"
            recipients = tuple(f"r{m}{i}@rcpt.test" for i in range(count))
            outcomes = agent.deliver(f"q{m}", Envelope(sender, recipients), MESSAGE)
            results.append((outcomes, sender, recipients))
    finally:
        agent.close()
    for outcomes, sender, recipients in results:
        check(outcomes, sender, recipients, server.transcript)
        if harmless(script):
            assert {o.status for o in outcomes} == {Status.DELIVERED}, (outcomes, script)


@pytest.mark.parametrize(("script", "expected"), SILENT_OR_ENDLESS)
def test_a_silent_or_endless_server_costs_about_one_timeout(
    dns: DNSStack,
    server: ScriptedServer,
    tmp_path: Path,
    script: dict[str, list[Reply]],
    expected: Status,
) -> None:
    server.reset(script)
    server.flood = not script
    agent = make_agent(dns, server.port, tmp_path, timeout=0.5)
    started = time.monotonic()
    try:
        (outcome,) = agent.deliver("q", Envelope("s@tenant.test", ("r@rcpt.test",)), MESSAGE)
    finally:
        server.flood = False
        agent.close()
    assert outcome.status == expected, outcome
    # Postfix's smtp_per_record_deadline: a reply must be complete within the timeout,
    # or a server trickling continuation lines holds the worker for ever.
    assert time.monotonic() - started < 3.0, outcome


# --- reply text travels into the worker's status report -----------------------------------


def report(last_error: str) -> Report:
    return Report(
        domain="bcd.test",
        state="backing off",
        queue=dict.fromkeys(QUEUE_STATES, 2**53 - 1),
        total=dict.fromkeys(OUTCOMES, 2**53 - 1),
        hour=dict.fromkeys(OUTCOMES, 2**53 - 1),
        last_error=last_error,
        last_error_at=1.7e9,
        last_delivery_at=1.7e9,
        next_due=None,
        taken=0,
        latency_counts=(2**53 - 1,) * (len(LATENCY_BOUNDS) + 1),
        latency_sum=1e300,
    )


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=MAX_TEXT))
# 300 CJK characters from a remote reply: 1800 bytes once JSON-escaped.
@example("\u4e00" * MAX_TEXT)
@example("\U0001f600" * MAX_TEXT)
def test_any_printable_last_error_fits_in_a_report(text: str) -> None:
    text = "".join(c for c in text if c.isprintable())  # what qmgr keeps: printable()
    data = encode_report(report(text))
    assert len(data) <= MAX_REPORT
    decoded = decode_report(data, "bcd.test")
    assert decoded.last_error is not None and text.startswith(decoded.last_error)
    assert len(decoded.last_error) >= min(len(text), 64)
