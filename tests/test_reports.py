"""Worker status reports: the strict wire format, and a supervisor that a lying worker
cannot crash, confuse or flood."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.config import Tenant
from nsmail.report import (
    MAX_REPORT,
    OUTCOMES,
    QUEUE_STATES,
    Report,
    ReportError,
    Tally,
    decode,
    encode,
)
from nsmail.supervisor import SILENT_AFTER, Slot, State, Supervisor

GOOD = Report(
    domain="bcd.test",
    state="backing off",
    queue=dict.fromkeys(QUEUE_STATES, 2),
    total={"sent": 5, "deferred": 1, "bounced": 0},
    hour={"sent": 5, "deferred": 1, "bounced": 0},
    last_error="<x@rcpt.test>: 451 4.3.0 try later",
    last_error_at=1.5e9,
    last_delivery_at=None,
    next_due=None,
    taken=0,
    latency_counts=(3, 2, 0, 0, 0, 0, 0, 0, 0, 0),
    latency_sum=4.5,
)


def test_a_report_round_trips() -> None:
    assert decode(encode(GOOD), "bcd.test") == GOOD


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (encode(GOOD), "claims"),  # decoded as another tenant's worker below
        (b"x" * (MAX_REPORT + 1), "more than"),
        (b"{not json", "not JSON"),
        (encode(GOOD).replace(b'"state"', b'"mood"'), "fields"),
        (encode(GOOD).replace(b'"sent":5', b'"sent":-5', 1), "count"),
        (encode(GOOD).replace(b'"sent":5', b'"sent":5.5', 1), "count"),
        (encode(GOOD).replace(b"backing off", b"on fire"), "state"),
        (encode(GOOD).replace(b"1500000000.0", b"NaN"), "time"),
        (encode(GOOD).replace(b"try later", b"try\\u0007later"), "text"),
    ],
)
def test_lies_are_refused(data: bytes, why: str) -> None:
    domain = "cde.test" if why == "claims" else "bcd.test"
    with pytest.raises(ReportError, match=why):
        decode(data, domain)


@given(st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_report_error(data: bytes) -> None:
    with contextlib.suppress(ReportError):
        decode(data, "bcd.test")


def test_the_hourly_tally_forgets() -> None:
    tally = Tally()
    tally.add("sent", 0.0)
    tally.add("bounced", 1800.0)
    assert tally.last_hour(3000.0) == {"sent": 1, "deferred": 0, "bounced": 1}
    assert tally.last_hour(3700.0) == {"sent": 0, "deferred": 0, "bounced": 1}
    assert tally.total == dict(zip(OUTCOMES, (1, 0, 1), strict=True))


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[Supervisor, Slot, socket.socket]]:
    """A supervisor's report handling for one slot, fed through a real socketpair."""
    # The real Supervisor's report path, without the namespaces and children that
    # __init__ and run() would bring: only the selector and the slots are used on it.
    supervisor = Supervisor.__new__(Supervisor)
    supervisor.selector = selectors.DefaultSelector()
    supervisor._last_summary = ""
    supervisor._status_due = float("inf")
    tenant = Tenant(
        "bcd.test", IPv4Address("198.51.100.70"), None, "bcd.test", 4000, 4000, tmp_path, (), "test"
    )
    slot = Slot(tenant)
    supervisor.slots = {tenant.domain: slot}
    worker_end, slot.reports = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    slot.reports.setblocking(False)
    supervisor.selector.register(slot.reports, 1, None)
    yield supervisor, slot, worker_end
    worker_end.close()
    if slot.reports is not None:
        slot.reports.close()


def test_a_lying_worker_is_refused_logged_and_ignored(
    supervised: tuple[Supervisor, Slot, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, slot, worker = supervised
    worker.send(encode(GOOD))
    supervisor._on_report(slot)
    assert slot.report == GOOD
    lies = [
        b"x" * 65000,  # oversized: truncated by the socket, refused
        b"\x00garbage",
        encode(GOOD).replace(b"bcd.test", b"cde.test"),  # another tenant's name
    ]
    with caplog.at_level(logging.WARNING):
        for lie in lies:
            worker.send(lie)
        supervisor._on_report(slot)
    assert slot.report == GOOD, "a lie changed what the supervisor believes"
    assert slot.refused_reports == 3
    assert "refused a status report" in caplog.text


def test_a_flood_is_read_in_bounded_bites(
    supervised: tuple[Supervisor, Slot, socket.socket],
) -> None:
    supervisor, slot, worker = supervised
    worker.setblocking(False)
    sent = 0
    try:
        while sent < 1000:
            worker.send(b"{}")
            sent += 1
    except BlockingIOError:
        pass
    supervisor._on_report(slot)  # returns after a bounded number of datagrams
    assert slot.refused_reports == 32


def test_a_worker_silent_for_long_shows_as_silent(
    supervised: tuple[Supervisor, Slot, socket.socket],
) -> None:
    # A worker stopped with SIGSTOP (its own user can do that) is alive to waitpid and
    # would show its last state, "idle", for ever.
    supervisor, slot, worker = supervised
    slot.state = State.RUNNING
    worker.send(encode(GOOD))
    supervisor._on_report(slot)
    (fresh,) = supervisor.statuses()
    assert fresh.state == "backing off"
    slot.reported_mono -= SILENT_AFTER + 1
    (stale,) = supervisor.statuses()
    assert stale.state == "silent" and stale.queue == GOOD.queue
