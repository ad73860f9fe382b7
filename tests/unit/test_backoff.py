"""One back-off: the doubling both schedules share, and the supervisor's restarts of its
workers and of its DNS relay counted alike."""

from __future__ import annotations

import selectors
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nsmail.core.config import Tenant
from nsmail.core.retry import RestartPolicy, backoff, quick_deaths, restart_delay
from nsmail.core.slots import State
from nsmail.root.handoff import InFlight
from nsmail.root.spawn import SpawnError, Zygote
from nsmail.root.supervisor import RESTARTS, Relay, Slot, Supervisor

POLICY = RestartPolicy(first=1.0, maximum=60.0, stable_after=60.0)
NOW = 5000.0  # the supervisor's clock, stopped


class StoppedClock:
    @staticmethod
    def monotonic() -> float:
        return NOW

    @staticmethod
    def time() -> float:
        return 1.7e9


def test_backoff_doubles_from_first_up_to_maximum_and_none_counts_as_one() -> None:
    assert [backoff(300, 4000, n) for n in range(6)] == [300, 300, 600, 1200, 2400, 4000]
    assert backoff(1, 60, 10**9) == 60  # no overflow, however many


def test_a_death_after_a_long_run_starts_back_off_afresh() -> None:
    assert quick_deaths(POLICY, 5, 59.9) == 6
    assert quick_deaths(POLICY, 5, 60.0) == 1
    assert quick_deaths(POLICY, 5, 0.0) == 6  # never started: as quick as it gets
    assert [restart_delay(POLICY, quick_deaths(POLICY, n, 0.0)) for n in range(3)] == [1, 2, 4]


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> Supervisor:
    """A supervisor's restart bookkeeping on a stopped clock, without the namespaces and
    children that __init__ and run() would bring."""
    monkeypatch.setattr("nsmail.root.supervisor.time", StoppedClock)
    supervisor = Supervisor.__new__(Supervisor)
    supervisor.selector = selectors.DefaultSelector()
    supervisor.stopping = False
    supervisor.relay = Relay()
    supervisor.zygote = Zygote()
    supervisor.slots = {}
    supervisor.handing_off = InFlight()
    return supervisor


def test_a_relay_that_cannot_start_is_tried_ever_more_rarely(supervisor: Supervisor) -> None:
    """As a worker that cannot start is: a relay that ran for long once must not be
    retried every second for ever because its last good run was long ago."""
    supervisor.relay.started_mono = NOW - 10 * RESTARTS.stable_after
    delays = []
    for _ in range(3):
        supervisor._relay_spawned(SpawnError("no such user"))
        delays.append(supervisor.relay.due - NOW)
    assert delays == [1, 2, 4]
    assert supervisor.relay.last_error == "could not start: no such user"


def test_workers_and_the_relay_back_off_alike(supervisor: Supervisor, tmp_path: Path) -> None:
    tenant = Tenant(
        "bcd.test", IPv4Address("198.51.100.70"), None, "bcd.test", 4000, 4000, tmp_path, (), "test"
    )
    slot = Slot(tenant, state=State.RUNNING, pid=12345)
    supervisor.slots[tenant.domain] = slot
    supervisor.relay.pid = 12346
    for ran in (0.0, 1.0, 2 * RESTARTS.stable_after, 0.0):
        slot.state, slot.pid = State.RUNNING, 12345
        slot.started_mono = supervisor.relay.started_mono = NOW - ran
        supervisor._exited(12345, "killed by SIGKILL")
        supervisor._exited(12346, "killed by SIGKILL")
        supervisor.relay.pid = 12346
        assert slot.state == State.BACKOFF
        assert (slot.crashes, slot.due) == (supervisor.relay.crashes, supervisor.relay.due)
    assert slot.crashes == 2 and slot.restarts == supervisor.relay.restarts == 4
