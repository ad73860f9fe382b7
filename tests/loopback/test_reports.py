"""Worker status reports: the strict wire format, and a supervisor that a lying worker
cannot crash, confuse or flood, nor end with a time it cannot wait for; and one whose own
handling of a worker fails contains that to the worker's tenant."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
import types
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.core.config import DeliveryConfig, Tenant
from nsmail.core.report import (
    MAX_REPORT,
    OUTCOMES,
    QUEUE_STATES,
    Report,
    ReportError,
    Tally,
    decode,
    encode,
)
from nsmail.core.slots import State
from nsmail.root.handoff import InFlight
from nsmail.root.listener import SubmissionFront
from nsmail.root.spawn import Zygote
from nsmail.root.supervisor import MAX_WAIT, RESTARTS, SILENT_AFTER, Relay, Slot, Supervisor

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
    tls_failures={"verified": 0, "dane": 3, "mta-sts": 1, "mta-sts-testing": 0},
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
        (encode(GOOD).replace(b"1500000000.0", b"1e300"), "time"),
        (encode(GOOD).replace(b"1500000000.0", b"253402300800.0"), "time"),  # past MAX_TIME
        (encode(GOOD).replace(b"try later", b"try\\u0007later"), "text"),
        (encode(GOOD).replace(b'"dane":3', b'"tlsa":3'), "counts"),  # no such policy
        (encode(GOOD).replace(b'"dane":3', b'"dane":-3'), "count"),
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
    supervisor.stopping = False
    supervisor.relay = Relay()
    supervisor.zygote = Zygote()
    supervisor._servers = []
    supervisor.handing_off = InFlight()
    supervisor.config = types.SimpleNamespace(delivery=DeliveryConfig())
    supervisor.suspended = {}  # the automatic brake: no tenant suspended, none with a rule
    supervisor._leftovers = []  # no SMTP client waits to be routed
    supervisor.front = SubmissionFront(
        supervisor.config,
        supervisor.zygote,
        supervisor.selector,
        lambda conn, given: None,
        RESTARTS,
    )  # 587 and 465 off
    tenant = Tenant(
        "bcd.test", IPv4Address("198.51.100.70"), None, "bcd.test", 4000, 4000, tmp_path, (), "test"
    )
    slot = Slot(tenant, state=State.STARTING)  # as if asked of the zygote: its channels made
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


def test_a_time_far_ahead_is_waited_for_in_bounded_steps(
    supervised: tuple[Supervisor, Slot, socket.socket],
) -> None:
    """A worker asleep until 30 days ahead (a time a valid report may name) is past what
    epoll can wait for: the loop waits at most MAX_WAIT, then looks again."""
    supervisor, slot, _ = supervised
    supervisor.relay.starting = True  # nothing else is due
    slot.state, slot.due = State.ASLEEP, time.monotonic() + 30 * 86400
    assert supervisor._timeout() == MAX_WAIT < 2**31 / 1000


def sleeper() -> int:
    """A child that waits to be killed, standing in for a worker."""
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    return pid


def killed(pid: int) -> bool:
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("with_worker", [True, False], ids=["worker", "no-worker"])
def test_a_handler_that_raises_is_contained_to_its_tenant(
    supervised: tuple[Supervisor, Slot, socket.socket],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    with_worker: bool,
) -> None:
    """A bug on the report path (decode raising what it never should): logged with the
    tenant; the worker's channels are closed (no handler keeps firing), and the slot
    goes the way of a crash: its worker is killed and restarted after back-off."""
    supervisor, slot, worker = supervised
    if with_worker:
        slot.state, slot.pid = State.RUNNING, sleeper()

    def bug(data: bytes, domain: str) -> Report:
        raise RuntimeError("a bug")

    monkeypatch.setattr("nsmail.root.supervisor.decode_report", bug)
    worker.send(encode(GOOD))
    with caplog.at_level(logging.ERROR):
        supervisor._on_report(slot)  # does not raise
    assert "bcd.test: internal error" in caplog.text and "RuntimeError: a bug" in caplog.text
    assert slot.reports is None and slot.relay_end is None
    if slot.pid is not None:
        assert killed(slot.pid)
        supervisor._exited(slot.pid, "killed by SIGKILL")  # as reaping finds it
    assert slot.state == State.BACKOFF and slot.pid is None
    assert time.monotonic() < slot.due < time.monotonic() + 2


def test_a_worker_forked_for_a_contained_slot_is_killed_when_it_comes(
    supervised: tuple[Supervisor, Slot, socket.socket],
) -> None:
    supervisor, slot, _ = supervised
    asked_with = slot.reports
    supervisor._contain(slot)  # while the zygote forks
    late = sleeper()
    supervisor._spawned(slot, asked_with, late)
    assert killed(late)
    assert slot.pid is None and slot.state == State.BACKOFF


def test_a_handler_that_raises_does_not_end_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR):
        Supervisor._dispatch(broken)
    assert "internal error in broken; carrying on" in caplog.text
