"""The queue's decisions (nsmail.core.scheduler) against fake agents and a fake clock."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from nsmail.core.scheduler import (
    IDLE,
    Action,
    Close,
    Defer,
    Open,
    Policy,
    Reason,
    Result,
    Scheduler,
    Send,
    State,
)

POLICY = Policy()


def scheduler(max_sessions: int = 100, policy: Policy = POLICY) -> Scheduler[str]:
    return Scheduler(lambda destination: policy, max_sessions)


def opens(actions: list[Action[str]]) -> list[Open[str]]:
    return [a for a in actions if isinstance(a, Open)]


def defers(actions: list[Action[str]]) -> list[Defer[str]]:
    return [a for a in actions if isinstance(a, Defer)]


# -- a world of fake agents on a fake clock ----------------------------------------------

# What a destination does with an attempt: the result and how long it takes.
Behaviour = Callable[[int], tuple[Result, float]]  # attempt number -> (result, seconds)


def healthy(seconds: float = 0.1) -> Behaviour:
    return lambda attempt: (Result.DELIVERED, seconds)


def tarpit(seconds: float = 300.0) -> Behaviour:
    return lambda attempt: (Result.UNREACHABLE, seconds)


@dataclass
class World:
    """Runs a scheduler against destinations that behave as told, on a simulated clock."""

    behaviours: dict[str, Behaviour]
    sched: Scheduler[str] = field(default_factory=scheduler)
    now: float = 0.0
    destination_of: dict[str, str] = field(default_factory=dict)
    session_of: dict[int, str] = field(default_factory=dict)  # session -> destination
    delivered: dict[str, float] = field(default_factory=dict)  # job -> when
    failed: dict[str, float] = field(default_factory=dict)
    deferred: dict[str, Reason] = field(default_factory=dict)
    closed: list[int] = field(default_factory=list)
    most_sessions: int = 0
    most_per_destination: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    _events: list[tuple[float, int, int, str, Result]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def submit(self, job: str, destination: str) -> None:
        self.destination_of[job] = destination
        self.apply(self.sched.submit(job, destination, self.now))

    def apply(self, actions: list[Action[str]]) -> None:
        for action in actions:
            if isinstance(action, Open):
                self.session_of[action.session] = action.destination
                self._start(action.session, action.job)
            elif isinstance(action, Send):
                self._start(action.session, action.job)
            elif isinstance(action, Close):
                self.closed.append(action.session)
                self.session_of.pop(action.session)
            else:
                assert action.job not in self.deferred
                self.deferred[action.job] = action.reason
        self.most_sessions = max(self.most_sessions, self.sched.sessions)
        for destination in set(self.session_of.values()):
            count = sum(1 for d in self.session_of.values() if d == destination)
            self.most_per_destination[destination] = max(
                self.most_per_destination.get(destination, 0), count
            )

    def _start(self, session: int, job: str) -> None:
        destination = self.session_of[session]
        attempt = self.attempts.get(destination, 0)
        self.attempts[destination] = attempt + 1
        result, seconds = self.behaviours[destination](attempt)
        heapq.heappush(self._events, (self.now + seconds, next(self._order), session, job, result))

    def run(self, until: float = float("inf")) -> None:
        while True:
            wakeup = self.sched.next_wakeup()
            next_event = self._events[0][0] if self._events else None
            candidates = [t for t in (wakeup, next_event) if t is not None]
            if not candidates or min(candidates) > until:
                self.now = max(self.now, until) if until != float("inf") else self.now
                return
            self.now = max(self.now, min(candidates))
            if next_event is not None and next_event <= self.now:
                _, _, session, job, result = heapq.heappop(self._events)
                self.session_of.pop(session, None) if result != Result.DELIVERED else None
                if result == Result.DELIVERED:
                    self.delivered[job] = self.now
                elif result in (Result.UNREACHABLE, Result.THROTTLED):
                    self.failed[job] = self.now
                reusable = result == Result.DELIVERED
                self.apply(self.sched.finished(session, job, result, reusable, self.now))
            else:
                self.apply(self.sched.tick(self.now))


# -- windows and caps ---------------------------------------------------------------------


def test_a_new_destination_gets_the_initial_window() -> None:
    sched = scheduler()
    actions = [a for i in range(10) for a in sched.submit(f"m{i}", "mx.test", 0.0)]
    assert len(opens(actions)) == POLICY.initial_concurrency == 5
    assert sched.sessions == 5 and not defers(actions)


def test_the_window_grows_on_success_up_to_the_limit() -> None:
    world = World({"mx.test": healthy(1.0)})
    for i in range(1000):
        world.submit(f"m{i}", "mx.test")
    world.run()
    assert len(world.delivered) == 1000
    assert world.most_per_destination["mx.test"] == POLICY.concurrency_limit == 20
    # Far fewer sessions opened than messages: they are kept and reused.
    assert len(world.closed) < 100


def test_the_window_grows_by_one_per_delivery_so_a_slow_receiver_gets_sessions_fast() -> None:
    """Postfix's default positive feedback: each round trip of a slow receiver doubles the
    sessions it gets, up to the limit."""
    world = World({"mx.test": healthy(1.0)})
    for i in range(200):
        world.submit(f"m{i}", "mx.test")
    world.run(until=1.5)
    assert world.most_per_destination["mx.test"] == 2 * POLICY.initial_concurrency
    world.run(until=2.5)
    assert world.most_per_destination["mx.test"] == POLICY.concurrency_limit


def test_the_tenant_never_has_more_than_max_sessions() -> None:
    world = World({f"mx{i}.test": healthy(1.0) for i in range(50)}, sched=scheduler(30))
    for i in range(1000):
        world.submit(f"m{i}", f"mx{i % 50}.test")
    world.run()
    assert len(world.delivered) == 1000
    assert world.most_sessions == 30


def test_destinations_take_turns_under_the_session_cap() -> None:
    """A destination with a thousand waiting jobs does not keep every session from one with
    a few: when a session frees up, the other destination gets its turn."""
    world = World({"big.test": healthy(1.0), "small.test": healthy(1.0)}, sched=scheduler(4))
    for i in range(1000):
        world.submit(f"big{i}", "big.test")
    for i in range(3):
        world.submit(f"small{i}", "small.test")
    world.run()
    assert max(world.delivered[f"small{i}"] for i in range(3)) <= 3.0


def test_idle_sessions_close_after_idle_and_make_room() -> None:
    world = World({"a.test": healthy(), "b.test": healthy()}, sched=scheduler(1))
    world.submit("m1", "a.test")
    world.run(until=0.5)
    assert "m1" in world.delivered and world.sched.sessions == 1  # kept, idle
    world.submit("m2", "b.test")  # the cap is reached: a's idle session gives way
    assert world.closed and "m2" not in world.deferred
    world.run()
    assert "m2" in world.delivered
    assert world.sched.sessions == 0 and world.now >= 0.5 + IDLE


def test_a_session_is_fresh_after_max_uses() -> None:
    world = World({"mx.test": healthy()}, sched=scheduler(1, Policy(max_uses=3)))
    for i in range(7):
        world.submit(f"m{i}", "mx.test")
    world.run()
    assert len(world.delivered) == 7 and len(world.closed) == 3  # 3 + 3 + 1 (idle)


# -- slow and dead destinations -------------------------------------------------------------


def test_a_tarpit_never_holds_up_another_destination() -> None:
    world = World({"tarpit.test": tarpit(300.0), "ok.test": healthy(0.5)})
    for i in range(3):
        world.submit(f"t{i}", "tarpit.test")
    for i in range(30):
        world.submit(f"ok{i}", "ok.test")
    world.run()
    assert max(world.delivered[f"ok{i}"] for i in range(30)) < 10.0
    assert set(world.failed) == {"t0", "t1", "t2"}


def test_a_destination_dies_after_dead_after_failures_and_its_mail_is_deferred_at_once() -> None:
    world = World({"dead.test": tarpit(30.0)})
    for i in range(20):
        world.submit(f"m{i}", "dead.test")
    world.run()
    # Five sessions time out; three in a row make it dead and the 15 waiting go back at
    # once instead of each waiting out its own timeout.
    assert len(world.failed) == 5
    assert len(world.deferred) == 15 and set(world.deferred.values()) == {Reason.DEAD}
    assert all(world.deferred) and world.now == 30.0
    (status,) = world.sched.status(world.now)
    assert status.state == State.DEAD and status.until == 30.0 + POLICY.probe_first
    world.submit("late", "dead.test")  # before the probe is due: deferred, no connection
    assert world.deferred["late"] == Reason.DEAD and world.attempts["dead.test"] == 5


def test_a_probe_revives_a_dead_destination() -> None:
    behaviour: dict[str, Behaviour] = {"mx.test": tarpit(1.0)}
    world = World(behaviour, sched=scheduler(policy=Policy(initial_concurrency=1)))
    for i in range(3):
        world.submit(f"m{i}", "mx.test")
    world.run()
    assert world.sched.status(world.now)[0].state == State.DEAD
    world.now += POLICY.probe_first
    behaviour["mx.test"] = healthy()  # it came back
    world.submit("probe", "mx.test")
    world.submit("behind", "mx.test")  # the probe is under way: deferred, not stacked up
    assert world.deferred["behind"] == Reason.DEAD
    world.run()
    assert "probe" in world.delivered
    world.submit("after", "mx.test")
    world.run()
    assert "after" in world.delivered and not world.sched.status(world.now + IDLE)


def test_a_failed_probe_doubles_the_wait() -> None:
    world = World({"mx.test": tarpit(1.0)}, sched=scheduler(policy=Policy(dead_after=1)))
    world.submit("m0", "mx.test")
    world.run()
    first = world.sched.status(world.now)[0].until
    assert first == world.now + POLICY.probe_first
    world.now = first
    world.submit("probe", "mx.test")
    world.run()
    second = world.sched.status(world.now)[0].until
    assert second == world.now + 2 * POLICY.probe_first


def test_failures_not_in_a_row_do_not_kill() -> None:
    pattern = [Result.UNREACHABLE, Result.UNREACHABLE, Result.DELIVERED] * 10
    world = World({"mx.test": lambda n: (pattern[n % len(pattern)], 1.0)})
    world.sched = scheduler(policy=Policy(initial_concurrency=1, concurrency_limit=1))
    for i in range(30):
        world.submit(f"m{i}", "mx.test")
    world.run()
    assert not world.deferred and len(world.delivered) == 10 and len(world.failed) == 20


def test_a_stale_kept_session_costs_nothing() -> None:
    sched = scheduler()
    (first,) = opens(sched.submit("m1", "mx.test", 0.0))
    assert sched.finished(first.session, "m1", Result.DELIVERED, True, 1.0) == []
    (send,) = sched.submit("m2", "mx.test", 1.5)
    assert send == Send(first.session, "m2")
    (again,) = sched.finished(first.session, "m2", Result.STALE, False, 1.6)
    assert isinstance(again, Open) and again.job == "m2"
    assert sched.status(1.6)[0].window == POLICY.initial_concurrency + 1


# -- slowing down ---------------------------------------------------------------------------


def test_a_throttle_halves_the_window_and_defers_the_destinations_mail_to_its_end() -> None:
    throttled_once = iter([Result.THROTTLED])
    world = World({"mx.test": lambda n: (next(throttled_once, Result.DELIVERED), 1.0)})
    for i in range(40):
        world.submit(f"m{i}", "mx.test")
    world.run(until=1.0)
    (status,) = world.sched.status(world.now)
    # Halved; the four sessions that delivered in the same second, started before the
    # slow-down, do not feed it back.
    assert status.state == State.THROTTLED and status.window == POLICY.initial_concurrency / 2
    assert status.until == 1.0 + POLICY.throttle_first
    # The throttled attempt counts as one; the mail behind it comes back at the pause's
    # end, together, instead of each message on its own backoff (or all of it in memory).
    assert list(world.failed) == ["m0"]
    assert len(world.deferred) == 35 and set(world.deferred.values()) == {Reason.THROTTLED}
    late = world.sched.submit("late", "mx.test", world.now + 1)
    assert late == [Defer("late", Reason.THROTTLED, "mx.test", 1.0 + POLICY.throttle_first)]
    world.now = 1.0 + POLICY.throttle_first
    world.submit("after", "mx.test")
    world.run()
    assert "after" in world.delivered


def test_repeated_throttles_lengthen_the_pause_within_its_maximum() -> None:
    policy = Policy(initial_concurrency=1, concurrency_limit=1, throttle_max=100.0)
    world = World({"mx.test": lambda n: (Result.THROTTLED, 0.0)}, sched=scheduler(policy=policy))
    pauses = []
    for n in range(6):
        world.submit(f"m{n}", "mx.test")  # due again when the pause ends
        world.run(until=world.now)
        (status,) = world.sched.status(world.now)
        assert status.until is not None
        pauses.append(status.until - world.now)
        world.now = status.until
        world.apply(world.sched.tick(world.now))
    assert pauses == [30.0, 60.0, 100.0, 100.0, 100.0, 100.0]
    assert not world.deferred and len(world.failed) == 6


# -- limits and stopping --------------------------------------------------------------------


def test_a_destination_holds_at_most_backlog_jobs() -> None:
    sched = scheduler(policy=Policy(initial_concurrency=1, concurrency_limit=1, backlog=3))
    actions = [a for i in range(6) for a in sched.submit(f"m{i}", "mx.test", 0.0)]
    assert len(opens(actions)) == 1
    assert [d.job for d in defers(actions)] == ["m4", "m5"]
    assert {d.reason for d in defers(actions)} == {Reason.BACKLOG}


def test_stop_gives_back_waiting_jobs_and_closes_sessions() -> None:
    sched = scheduler(policy=Policy(initial_concurrency=1, concurrency_limit=1))
    (busy,) = opens(sched.submit("m1", "a.test", 0.0))
    (idle,) = opens(sched.submit("m2", "b.test", 0.0))
    sched.submit("m3", "a.test", 0.0)
    sched.finished(idle.session, "m2", Result.DELIVERED, True, 1.0)
    actions = sched.stop()
    assert Defer("m3", Reason.STOPPING, "a.test", None) in actions
    assert Close(idle.session) in actions
    assert sched.finished(busy.session, "m1", Result.DELIVERED, True, 2.0) == [Close(busy.session)]
    assert sched.submit("m4", "a.test", 2.0) == [Defer("m4", Reason.STOPPING, "a.test", None)]
    assert sched.sessions == 0 and not sched.busy


# -- invariants, whatever the destinations do -----------------------------------------------

results = st.sampled_from(list(Result))


@settings(max_examples=200, deadline=None)
@given(
    plan=st.lists(st.tuples(st.integers(0, 4), results, st.floats(0, 400)), max_size=60),
    max_sessions=st.integers(1, 8),
    initial=st.integers(1, 3),
)
def test_every_job_ends_exactly_once_within_the_caps(
    plan: list[tuple[int, Result, float]], max_sessions: int, initial: int
) -> None:
    outcomes = [(result, seconds) for _, result, seconds in plan] or [(Result.DELIVERED, 1.0)]
    draws = itertools.count()

    def behaviour(attempt: int) -> tuple[Result, float]:
        # A stale session for ever would never end: after a few, it delivers.
        result, seconds = outcomes[next(draws) % len(outcomes)]
        if attempt > 50 and result == Result.STALE:
            result = Result.DELIVERED
        return result, seconds

    policy = Policy(initial_concurrency=initial, concurrency_limit=3, dead_after=2)
    world = World(
        {f"d{i}.test": behaviour for i in range(5)}, sched=scheduler(max_sessions, policy)
    )
    for n, (destination, _, _) in enumerate(plan):
        world.submit(f"m{n}", f"d{destination}.test")
    world.run()
    ended = [*world.delivered, *world.failed, *world.deferred]
    assert sorted(ended) == sorted(f"m{n}" for n in range(len(plan)))  # once each
    assert world.most_sessions <= max_sessions
    assert all(n <= 3 for n in world.most_per_destination.values())
    assert not world.sched.busy


def test_a_job_back_from_a_destination_that_died_meanwhile_is_deferred() -> None:
    """Found by the invariant test: a session opened before the destination died comes
    back with a stale or throttled job; it must not wait for a probe no one will start."""
    sched = scheduler(policy=Policy(initial_concurrency=2, concurrency_limit=2, dead_after=1))
    first, second = opens(
        [*sched.submit("m1", "mx.test", 0.0), *sched.submit("m2", "mx.test", 0.0)]
    )
    sched.finished(first.session, "m1", Result.UNREACHABLE, False, 1.0)  # dead now
    actions = sched.finished(second.session, "m2", Result.STALE, False, 1.0)
    assert actions == [Defer("m2", Reason.DEAD, "mx.test", 1.0 + POLICY.probe_first)]
    assert not sched.busy


def test_a_slow_down_from_a_probe_proves_the_destination_alive() -> None:
    sched = scheduler(policy=Policy(dead_after=1))
    (first,) = opens(sched.submit("m1", "mx.test", 0.0))
    sched.finished(first.session, "m1", Result.UNREACHABLE, False, 0.0)
    (probe,) = opens(sched.submit("m2", "mx.test", POLICY.probe_first))
    assert sched.finished(probe.session, "m2", Result.THROTTLED, False, 61.0) == []
    (status,) = sched.status(61.0)
    assert status.state == State.THROTTLED and status.waiting == 0
