"""Which job goes to which destination over which session, and when: the queue's decisions.

Postfix's qmgr and mox's queue are the models. Work is split by destination (a set of mail
hosts, named by the caller); each destination has a concurrency window that starts at
`initial_concurrency`, grows by one for every delivery and shrinks by one for every
failure to reach it (Postfix's default feedback), within `concurrency_limit`; the tenant
as a whole has at most `max_sessions` sessions. A session is kept open and given its
destination's next job; it is closed when idle for `IDLE` seconds, used `max_uses` times,
or when its place is needed for another destination.
Destinations with waiting jobs take turns, so one busy destination cannot starve another.

A destination that fails `dead_after` times in a row (refused, timed out, dropped) is dead:
its waiting jobs are deferred at once, and so is every job that comes for it until a probe
is due; then one job goes as the probe. Its success revives the destination; its failure
doubles the wait for the next probe. A server that asks to slow down (421, rate-limit
replies) halves the window and pauses the destination, longer at each repeat: its waiting
jobs, and those that come meanwhile, are deferred to the end of the pause, so they come
back together at the destination's time instead of each on its own backoff, and memory
does not fill with mail for a server that keeps saying no. No destination holds more than
`backlog` waiting jobs: beyond that they are deferred, so the messages in memory are never
all one destination's.

Pure: events and the time come in, actions go out; a job is the caller's value, opaque
here. A job submitted ends in exactly one Defer, or in an Open or Send that the caller
finishes as DELIVERED, UNREACHABLE or THROTTLED; after STALE it is the scheduler's again.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

Job = TypeVar("Job")

# Seconds sessions in flight may go on after a stop, before the engine cuts them off:
# here, not in the engine, so the supervisor can wait for them without importing it.
STOP_GRACE = 20.0
IDLE = 2.0  # seconds a session waits for another job (Postfix's connection cache time)
TURN = 10  # transactions a destination's last session may carry while others wait for one


@dataclass(frozen=True, slots=True)
class Policy:
    """How hard to push one destination."""

    initial_concurrency: int = 5  # Postfix's initial_destination_concurrency
    concurrency_limit: int = 20  # Postfix's default_destination_concurrency_limit
    dead_after: int = 3  # failures to reach it, in a row
    probe_first: float = 60.0  # seconds from death to the first probe; doubles per failure
    probe_max: float = 3600.0
    throttle_first: float = 30.0  # seconds of pause after a "slow down"; doubles per repeat
    throttle_max: float = 600.0
    max_uses: int = 100  # transactions per session before a fresh one
    backlog: int = 1000  # jobs waiting for it, at most

    def __post_init__(self) -> None:
        if not 1 <= self.initial_concurrency <= self.concurrency_limit:
            raise ValueError("needs 1 <= initial_concurrency <= concurrency_limit")
        if min(self.dead_after, self.max_uses, self.backlog) < 1:
            raise ValueError("dead_after, max_uses and backlog must be at least 1")
        if not 0 < self.probe_first <= self.probe_max:
            raise ValueError("needs 0 < probe_first <= probe_max")
        if not 0 < self.throttle_first <= self.throttle_max:
            raise ValueError("needs 0 < throttle_first <= throttle_max")


class Result(StrEnum):
    """What an Open or Send came to, as far as the destination is concerned."""

    # The server worked; the caller has settled the job, whatever its recipients' replies.
    DELIVERED = "delivered"
    # Not opened, or broke (refused, timed out, dropped): the caller has settled the job as
    # a temporary failure.
    UNREACHABLE = "unreachable"
    # The server asked to slow down: the caller has settled the job (it was an attempt).
    THROTTLED = "throttled"
    # A kept session turned out closed when reused: no one's fault, the job goes again.
    STALE = "stale"


class Reason(StrEnum):
    """Why a job is deferred without an attempt."""

    DEAD = "dead"  # its destination is dead and no probe is due
    THROTTLED = "throttled"  # its destination asked to slow down: it pauses until `until`
    BACKLOG = "backlog"  # its destination has `backlog` jobs waiting already
    STOPPING = "stopping"  # the worker is stopping


@dataclass(frozen=True, slots=True)
class Open(Generic[Job]):
    """Open session `session` to `destination`, and attempt `job` on it."""

    session: int
    destination: str
    job: Job


@dataclass(frozen=True, slots=True)
class Send(Generic[Job]):
    """Attempt `job` on the open session `session`."""

    session: int
    job: Job


@dataclass(frozen=True, slots=True)
class Close:
    """End session `session` (QUIT): idle, used up, or its place is needed."""

    session: int


@dataclass(frozen=True, slots=True)
class Defer(Generic[Job]):
    """Give `job` back to the queue without an attempt."""

    job: Job
    reason: Reason
    destination: str
    until: float | None  # DEAD: when the next probe is due; THROTTLED: the end of the pause


Action = Open[Job] | Send[Job] | Close | Defer[Job]


class State(StrEnum):
    ACTIVE = "active"
    THROTTLED = "throttled"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """One destination as operators see it (nsmail status)."""

    name: str
    state: State
    sessions: int
    waiting: int
    window: float
    until: float | None  # THROTTLED: the end of the pause; DEAD: the next probe


@dataclass
class _Destination(Generic[Job]):
    name: str
    policy: Policy
    window: float
    waiting: deque[Job] = field(default_factory=deque)
    sessions: set[int] = field(default_factory=set)  # opening, busy or idle
    failures: int = 0  # failures to reach it, in a row
    dead_until: float | None = None  # set while dead, even past it, until a probe succeeds
    probing: bool = False
    probe_delay: float = 0.0  # the wait before the next probe, after the next failure
    throttled_until: float | None = None
    throttle_delay: float = 0.0  # the pause after the next "slow down"

    def state(self, now: float) -> State:
        if self.dead_until is not None:
            return State.DEAD
        if self.throttled_until is not None and now < self.throttled_until:
            return State.THROTTLED
        return State.ACTIVE

    def room(self) -> int:
        """How many sessions it may have: its window, or one probe."""
        return 1 if self.dead_until is not None else int(self.window)


@dataclass
class _Session:
    destination: str
    probe: bool = False  # opened to see whether a dead destination is back
    uses: int = 0


class Scheduler(Generic[Job]):
    """The destinations of one tenant's worker and the sessions open to them."""

    def __init__(self, policy_of: Callable[[str], Policy], max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._policy_of = policy_of
        self._max_sessions = max_sessions
        self._destinations: dict[str, _Destination[Job]] = {}
        self._sessions: dict[int, _Session] = {}
        # Sessions kept for their destination's next job, and since when: their own
        # table, as at the session cap every start looks for one to close.
        self._idle: dict[int, float] = {}
        self._ids = itertools.count(1)
        # Destinations with waiting jobs that may start one, in turn (an ordered set).
        self._turns: dict[str, None] = {}
        self._stopping = False

    # -- events -------------------------------------------------------------------------

    def submit(self, job: Job, destination: str, now: float) -> list[Action[Job]]:
        """A job for `destination`."""
        place = self._destination(destination)
        if self._stopping:
            return [Defer(job, Reason.STOPPING, destination, None)]
        if place.dead_until is not None and (place.probing or now < place.dead_until):
            return [Defer(job, Reason.DEAD, destination, place.dead_until)]
        if place.state(now) == State.THROTTLED:
            return [Defer(job, Reason.THROTTLED, destination, place.throttled_until)]
        if len(place.waiting) >= place.policy.backlog:
            return [Defer(job, Reason.BACKLOG, destination, None)]
        place.waiting.append(job)
        self._wants_turn(place)
        return self._pump(now)

    def finished(
        self, session: int, job: Job, result: Result, reusable: bool, now: float
    ) -> list[Action[Job]]:
        """The Open or Send of `job` on `session` came to `result`; `reusable`: the session
        is open and clean for another transaction (only with DELIVERED)."""
        state = self._sessions[session]
        place = self._destinations[state.destination]
        state.uses += 1
        actions: list[Action[Job]] = []
        if result == Result.UNREACHABLE:
            actions += self._unreachable(place, state, now)
        elif result == Result.STALE:
            place.waiting.appendleft(job)  # first in line again, backlog or not
        else:
            self._reached(place, delivered=result == Result.DELIVERED)
            if result == Result.THROTTLED:
                actions += self._throttled(place, now)
        if result == Result.DELIVERED and reusable:
            actions += self._after_use(session, state, place, now)
        else:
            self._forget(session)
        self._wants_turn(place)
        return actions + self._pump(now)

    def tick(self, now: float) -> list[Action[Job]]:
        """What falls due at `now`: idle sessions to close, paused destinations to resume."""
        actions: list[Action[Job]] = []
        for session, since in list(self._idle.items()):
            if now >= since + IDLE:
                self._forget(session)
                actions.append(Close(session))
        for place in self._destinations.values():
            if place.throttled_until is not None and now >= place.throttled_until:
                place.throttled_until = None
                self._wants_turn(place)
        return actions + self._pump(now)

    def stop(self) -> list[Action[Job]]:
        """Start nothing more: give back every waiting job, close the idle sessions, and
        close each busy one when its attempt ends (the caller bounds how long that takes)."""
        self._stopping = True
        actions: list[Action[Job]] = []
        for place in self._destinations.values():
            actions += self._defer_waiting(place, Reason.STOPPING)
        for session in list(self._idle):
            self._forget(session)
            actions.append(Close(session))
        return actions

    # -- questions ------------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """When `tick` has something to do next, if ever."""
        times = [since + IDLE for since in self._idle.values()]
        times += [
            place.throttled_until
            for place in self._destinations.values()
            if place.throttled_until is not None and place.waiting
        ]
        return min(times, default=None)

    @property
    def sessions(self) -> int:
        """Sessions opening, busy or idle."""
        return len(self._sessions)

    @property
    def busy(self) -> bool:
        """Whether a job waits or is being attempted (idle sessions do not count)."""
        return len(self._idle) < len(self._sessions) or any(
            place.waiting for place in self._destinations.values()
        )

    def status(self, now: float) -> list[DestinationStatus]:
        """The destinations worth showing: those with sessions or waiting jobs, and those
        throttled or dead."""
        shown = []
        for place in self._destinations.values():
            state = place.state(now)
            if state == State.ACTIVE and not place.sessions and not place.waiting:
                continue
            shown.append(
                DestinationStatus(
                    name=place.name,
                    state=state,
                    sessions=len(place.sessions),
                    waiting=len(place.waiting),
                    window=place.window,
                    until={
                        State.DEAD: place.dead_until,
                        State.THROTTLED: place.throttled_until,
                    }.get(state),
                )
            )
        return shown

    # -- decisions ------------------------------------------------------------------------

    def _destination(self, name: str) -> _Destination[Job]:
        place = self._destinations.get(name)
        if place is None:
            policy = self._policy_of(name)
            place = _Destination(
                name,
                policy,
                float(policy.initial_concurrency),
                probe_delay=policy.probe_first,
                throttle_delay=policy.throttle_first,
            )
            self._destinations[name] = place
        return place

    def _reached(self, place: _Destination[Job], *, delivered: bool) -> None:
        """The server answered: whatever it said, it is not dead. Only a delivery, not a
        "slow down", ends the lengthening of pauses, and feeds the window unless the
        destination is paused (sessions started before the slow-down do not undo it)."""
        policy = place.policy
        place.failures = 0
        if place.dead_until is not None:  # the probe got through
            place.dead_until = None
            place.probing = False
            place.probe_delay = policy.probe_first
            place.window = float(policy.initial_concurrency)
        elif delivered and place.throttled_until is None:
            # Postfix's default positive feedback (1, not 1/concurrency): a slow receiver
            # doubles its sessions each round trip until the limit, as with Postfix.
            place.window = min(float(policy.concurrency_limit), place.window + 1)
        if delivered:
            place.throttle_delay = policy.throttle_first

    def _unreachable(
        self, place: _Destination[Job], session: _Session, now: float
    ) -> list[Action[Job]]:
        place.window = max(1.0, place.window - 1)
        place.failures += 1
        if place.dead_until is not None and not session.probe:
            return []  # opened before it died: its death is already counted
        if place.dead_until is None and place.failures < place.policy.dead_after:
            return []
        # Dead now, or its probe failed: wait longer before the next probe.
        place.dead_until = now + place.probe_delay
        place.probe_delay = min(place.policy.probe_max, place.probe_delay * 2)
        place.probing = False
        return self._defer_waiting(place, Reason.DEAD)

    @staticmethod
    def _defer_waiting(place: _Destination[Job], reason: Reason) -> list[Action[Job]]:
        until = {Reason.DEAD: place.dead_until, Reason.THROTTLED: place.throttled_until}.get(reason)
        deferred: list[Action[Job]] = [
            Defer(job, reason, place.name, until) for job in place.waiting
        ]
        place.waiting.clear()
        return deferred

    def _throttled(self, place: _Destination[Job], now: float) -> list[Action[Job]]:
        place.window = max(1.0, place.window / 2)
        place.throttled_until = now + place.throttle_delay
        place.throttle_delay = min(place.policy.throttle_max, place.throttle_delay * 2)
        return self._defer_waiting(place, Reason.THROTTLED)

    def _after_use(
        self, session: int, state: _Session, place: _Destination[Job], now: float
    ) -> list[Action[Job]]:
        """A session that just finished a job: the next job, idle, or closed."""
        too_many = len(place.sessions) > place.room()  # the window shrank under it
        # At the cap, a session goes back to the pool when another destination waits for
        # one: kept sessions must not let a busy destination keep every place. Its last
        # session a destination keeps for TURN transactions: at the cap, with more
        # destinations than places, closing every session after one message would make
        # each message pay for a session of its own.
        give_way = (
            len(self._sessions) >= self._max_sessions
            and (len(place.sessions) > 1 or state.uses % TURN == 0)
            and self._starved(place, now)
        )
        if self._stopping or state.uses >= place.policy.max_uses or too_many or give_way:
            self._forget(session)
            return [Close(session)]
        if place.waiting and place.state(now) == State.ACTIVE:
            return [Send(session, place.waiting.popleft())]
        self._idle[session] = now
        return []

    def _starved(self, other_than: _Destination[Job], now: float) -> bool:
        """Whether a destination other than `other_than` waits for a session it may open."""
        for name in self._turns:
            place = self._destinations[name]
            if place is other_than or not place.waiting or not self._may_start(place, now):
                continue
            if len(place.sessions) < place.room():
                return True
        return False

    def _wants_turn(self, place: _Destination[Job]) -> None:
        if place.waiting:
            self._turns.setdefault(place.name)

    def _pump(self, now: float) -> list[Action[Job]]:
        """Start what may start, one job per destination per round, until nothing can. Each
        round serves the destinations with the fewest sessions first, so a free place under
        max_sessions goes to the one that has least."""
        actions: list[Action[Job]] = []
        while not self._stopping and (self._idle or len(self._sessions) < self._max_sessions):
            started = False
            line = sorted(self._turns, key=lambda name: len(self._destinations[name].sessions))
            self._turns.clear()
            for name in line:
                place = self._destinations[name]
                if place.waiting and self._may_start(place, now):
                    step = self._start_one(place, now)
                    actions += step
                    started = started or bool(step)
                elif place.dead_until is not None:
                    actions += self._defer_waiting(place, Reason.DEAD)
                if not self._window_full(place):  # else its next turn comes as one ends
                    self._wants_turn(place)
            if not started:
                break
        return actions

    @staticmethod
    def _may_start(place: _Destination[Job], now: float) -> bool:
        """Active, or dead with its probe due and not yet under way."""
        state = place.state(now)
        if state == State.DEAD:
            assert place.dead_until is not None
            return not place.probing and now >= place.dead_until
        return state == State.ACTIVE

    def _window_full(self, place: _Destination[Job]) -> bool:
        """Whether each of its sessions is busy and it may open no more."""
        return len(place.sessions) >= place.room() and not any(
            s in self._idle for s in place.sessions
        )

    def _start_one(self, place: _Destination[Job], now: float) -> list[Action[Job]]:
        idle = sorted(s for s in place.sessions if s in self._idle)
        if idle:
            del self._idle[idle[0]]
            return [Send(idle[0], place.waiting.popleft())]
        if len(place.sessions) >= place.room():
            return []
        actions: list[Action[Job]] = []
        if len(self._sessions) >= self._max_sessions:
            close = self._close_an_idle()
            if close is None:
                return []
            actions.append(close)
        probe = place.dead_until is not None
        place.probing = probe
        session = next(self._ids)
        self._sessions[session] = _Session(place.name, probe=probe)
        place.sessions.add(session)
        return [*actions, Open(session, place.name, place.waiting.popleft())]

    def _close_an_idle(self) -> Close | None:
        """Make room under max_sessions: close the session idle longest."""
        if not self._idle:
            return None
        session = min(self._idle, key=lambda s: (self._idle[s], s))
        self._forget(session)
        return Close(session)

    def _forget(self, session: int) -> None:
        self._idle.pop(session, None)
        state = self._sessions.pop(session)
        place = self._destinations[state.destination]
        place.sessions.discard(session)
        self._wants_turn(place)
