"""Hostile SMTP replies, fuzzed, against the asyncio session (`nsmail.tenant.smtp`).

The same scripted server, strategies and transcript oracle (`scripted_smtp`) as
tests/fuzz/test_fuzz_smtp.py, which drives the smtplib agent: a client that takes a stale
line for the answer to its next command, delivers without a 2yz after the dot, or bounces
without a well-formed 5yz, fails here too. Failures map to outcomes as the agent maps them:
a 5yz in the transaction (or a stated SIZE too small) bounces, anything before it defers,
and a failed opportunistic handshake is retried at once in the clear.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, example, given, settings
from scripted_smtp import (
    MESSAGE,
    MESSAGES,
    SCRIPTS,
    SILENT_OR_ENDLESS,
    Reply,
    ScriptedServer,
    check,
    harmless,
    tls_contexts,
)

from nsmail.core.outcome import Outcome, Status
from nsmail.core.smtp import Delivered, Failure, Kind, Stage, TlsMode
from nsmail.tenant.smtp import Session, SessionError, Timeouts, TlsContexts, open_session

TRANSACTION = (Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.DOT)


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    made = ScriptedServer()
    try:
        yield made
    finally:
        made.close()


def uniform(seconds: float) -> Timeouts:
    return Timeouts(**{f.name: seconds for f in dataclasses.fields(Timeouts)})


def contexts() -> TlsContexts:
    opportunistic, verifying = tls_contexts()
    return TlsContexts(opportunistic, verifying)


async def session(port: int, timeouts: Timeouts) -> Session:
    """A session as the agent opens one: STARTTLS when offered, in clear if that fails."""
    for mode in (TlsMode.MAY, TlsMode.NONE):
        try:
            return await open_session(
                IPv4Address("127.0.0.1"),
                port,
                source=None,
                ehlo="mail.tenant.test",
                tls=mode,
                contexts=contexts(),
                timeouts=timeouts,
                server_name="mx.rcpt.test",
            )
        except SessionError as e:
            if (e.failure.kind, e.failure.stage) != (Kind.TLS, Stage.TLS):
                raise
    raise AssertionError("unreachable")


def outcome(recipient: str, result: Delivered | Failure) -> Outcome:
    if isinstance(result, Delivered):
        return Outcome(recipient, Status.DELIVERED, result.reply.code, result.reply.text, "")
    # What nsmail decides itself (UNSENDABLE) carries no reply code, only its status code.
    code = result.reply.code if result.reply else None
    text = (
        result.words if result.reply or not result.enhanced else f"{result.enhanced} {result.words}"
    )
    bounce = result.permanent and (result.stage in TRANSACTION or result.kind is Kind.UNSENDABLE)
    status = Status.PERMANENT if bounce else Status.TEMPORARY
    return Outcome(recipient, status, code, text, "")


async def deliver_all(
    port: int, messages: Sequence[tuple[str, tuple[str, ...]]], timeouts: Timeouts
) -> list[list[Outcome]]:
    done: list[list[Outcome]] = []
    kept: Session | None = None
    try:
        for sender, recipients in messages:
            if kept is None or not kept.usable:
                try:
                    kept = await session(port, timeouts)
                except SessionError as e:
                    done.append([outcome(r, e.failure) for r in recipients])
                    continue
            results = await kept.deliver(sender, recipients, MESSAGE)
            done.append([outcome(r, results[r]) for r in recipients])
    finally:
        if kept is not None:
            await kept.quit()
    return done


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=SCRIPTS, messages=MESSAGES)
@example(script={"DATA": [Reply(b"250 2.0.0 ok\r\n")]}, messages=[1])
@example(script={"DOT": [Reply(b"250-ok\r\nzz\r\n250 ok\r\n")]}, messages=[1, 1])
@example(script={"RCPT": [Reply(b"252 2.1.5 cannot verify, will try\r\n")]}, messages=[1])
@example(script={"EHLO": [Reply(b"250-mx\r\n250 SIZE \xb2\r\n")]}, messages=[1])
@example(script={"EHLO": [Reply(b"250-mx\r\n250 SIZE " + b"9" * 5000 + b"\r\n")]}, messages=[1])
@example(
    script={"EHLO": [Reply(b"250-mx\r\n250 STARTTLS\r\n")], "STARTTLS": [Reply(b"220 go\r\n")]},
    messages=[1, 2],
)
def test_hostile_replies_give_one_defined_outcome_per_recipient(
    server: ScriptedServer, script: dict[str, list[Reply]], messages: list[int]
) -> None:
    server.reset(script)
    planned = [
        (f"s{m}@tenant.test", tuple(f"r{m}{i}@rcpt.test" for i in range(count)))
        for m, count in enumerate(messages)
    ]
    done = asyncio.run(deliver_all(server.port, planned, uniform(2.0)))
    for outcomes, (sender, recipients) in zip(done, planned, strict=True):
        check(outcomes, sender, recipients, server.transcript)
        if harmless(script):
            assert {o.status for o in outcomes} == {Status.DELIVERED}, (outcomes, script)


@pytest.mark.parametrize(("script", "status"), SILENT_OR_ENDLESS)
def test_a_silent_or_endless_server_ends_at_a_deadline_or_a_bound(
    server: ScriptedServer, script: dict[str, list[Reply]], status: Status
) -> None:
    server.reset(script)
    server.flood = not script
    try:
        [[result]] = asyncio.run(
            deliver_all(server.port, [("s@tenant.test", ("r@rcpt.test",))], uniform(0.5))
        )
    finally:
        server.flood = False
    assert result.status == status, result
