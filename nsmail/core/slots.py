"""A tenant's slot in the supervisor, as one table from state and event to the next step.

The supervisor (`nsmail.root.supervisor`) keeps a slot per tenant. What happens to it,
its worker forked, dying, retiring for want of work, stopped, restarted by a reload or
after a supervisor bug, is an `Event`; `step` looks up what the slot becomes and the
`Action`s the supervisor then carries out, in order (signal, fork via the zygote, close
channels, remove the namespace, schedule a time). The data an action needs (the pid,
the error to show, the tenant that replaces this one) stays with the supervisor: the
table knows states only, as h11's `_state.py` does for HTTP.

Every pair of state and event is either a step in `TABLE` or `REFUSED`: an event that
cannot happen in that state (no worker to exit, no watch to fire). The supervisor
treats a refused event as its own bug, contained to the tenant like any other
(`Event.CONTAINED`, which every state takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    NEW = "new"  # made for a tenant the configuration names, and added at once
    STARTING = "starting"  # the zygote is forking its worker
    RUNNING = "running"
    BACKOFF = "backoff"  # no worker: it died or could not start; the next start is due later
    ASLEEP = "asleep"  # the worker exited for want of work: its watch or its time wakes it
    STOPPING = "stopping"  # the worker was told to end: SIGKILL when its grace is up
    STOPPING_WHILE_FORKING = "stopping while forking"  # its worker is told to end as it comes
    GONE = "gone"  # removed; started again as a new slot if a replacement was named


class Event(StrEnum):
    ADDED = "added"  # taken in: at start-up, on reload, or replacing a slot now gone
    SPAWNED = "spawned"  # the zygote forked the worker asked for
    SPAWN_FAILED = "spawn failed"  # preparing its namespace or queue, or forking, failed
    EXITED = "exited"  # the worker ended, other than RETIRED
    RETIRED = "retired"  # it exited 0 after handing over its watch: no work for now
    DUE = "due"  # the slot's scheduled time came (`waits_for_time`)
    WATCH_FIRED = "watch fired"  # mail came for a tenant asleep
    REMOVED = "removed"  # stop, and nothing after: gone from the configuration, or shutdown
    CHANGED = "changed"  # stop, then start with the tenant's new configuration
    KEPT = "kept"  # a reload left the tenant as it was
    CONTAINED = "contained"  # work for this slot raised: a bug, contained to the tenant


class Action(StrEnum):
    START = "start"  # prepare namespace and queue, open channels, ask the zygote for a worker
    STARTED = "started"  # note when the worker started
    SLEEP = "sleep"  # watch the handed-over descriptor; wake at the reported next due time
    TERMINATE = "terminate"  # SIGTERM, and SIGKILL when the stop grace is up
    FORCE = "force"  # the grace is up: SIGKILL, and look again after another grace
    KILL = "kill"  # SIGKILL at once (reaping brings EXITED)
    CLOSE_CHANNELS = "close channels"  # the DNS and report channels: the worker's calls end
    DROP_WATCH = "drop watch"
    COUNT_DEATH = "count death"  # a restart; a quick death in a row if it ran briefly
    COUNT_FAILURE = "count failure"  # a quick death in a row: no worker ran
    BACK_OFF = "back off"  # show the error; the next start after the restart delay
    SET_REPLACEMENT = "set replacement"  # the event's tenant starts after the stop, or none
    STOPPED = "stopped"  # note that the worker ended as asked
    FINISH = "finish"  # forget the slot, remove its namespace, start its replacement


@dataclass(frozen=True, slots=True)
class Step:
    """What a slot becomes on an event, and what the supervisor does then, in order."""

    state: State
    actions: tuple[Action, ...] = ()


class Refused(Exception):
    """An event that cannot happen in the slot's state: the supervisor's own bug."""


def step(state: State, event: Event) -> Step:
    """The step `event` takes a slot in `state` to; raises Refused if it cannot happen."""
    if event in REFUSED[state]:
        raise Refused(f"{event} cannot happen to a slot {state}")
    return TABLE[state][event]


def waits_for_time(state: State) -> bool:
    """Whether a slot in `state` has a time due: the supervisor wakes for it (`Event.DUE`)."""
    return Event.DUE in TABLE[state]


# START and FINISH come last in a step: START's outcome may come back at once as another
# event of the same slot (SPAWN_FAILED), and FINISH ends the slot.
_CLEAN = (Action.CLOSE_CHANNELS, Action.DROP_WATCH)
_FAILED = (*_CLEAN, Action.COUNT_FAILURE, Action.BACK_OFF)
_FINISH = (*_CLEAN, Action.FINISH)
_WAKE = (Action.DROP_WATCH, Action.START)
_THEN = (Action.SET_REPLACEMENT,)  # the event's tenant starts after the stop (REMOVED: none)

TABLE: dict[State, dict[Event, Step]] = {
    State.NEW: {
        Event.ADDED: Step(State.STARTING, (Action.START,)),
        Event.CONTAINED: Step(State.BACKOFF, _FAILED),
    },
    State.STARTING: {
        Event.SPAWNED: Step(State.RUNNING, (Action.STARTED,)),
        Event.SPAWN_FAILED: Step(State.BACKOFF, _FAILED),
        Event.REMOVED: Step(State.STOPPING_WHILE_FORKING, _THEN),
        Event.CHANGED: Step(State.STOPPING_WHILE_FORKING, _THEN),
        Event.KEPT: Step(State.STARTING),
        # Its channels closed, the worker still being forked is killed when it comes.
        Event.CONTAINED: Step(State.BACKOFF, _FAILED),
    },
    State.RUNNING: {
        Event.EXITED: Step(State.BACKOFF, (*_CLEAN, Action.COUNT_DEATH, Action.BACK_OFF)),
        Event.RETIRED: Step(State.ASLEEP, (Action.CLOSE_CHANNELS, Action.SLEEP)),
        Event.REMOVED: Step(State.STOPPING, (*_THEN, Action.TERMINATE)),
        Event.CHANGED: Step(State.STOPPING, (*_THEN, Action.TERMINATE)),
        Event.KEPT: Step(State.RUNNING),
        # Reaping the killed worker brings EXITED, and with it the back-off.
        Event.CONTAINED: Step(State.RUNNING, (*_CLEAN, Action.KILL)),
    },
    State.BACKOFF: {
        Event.DUE: Step(State.STARTING, (Action.START,)),
        Event.REMOVED: Step(State.GONE, (*_THEN, *_FINISH)),
        Event.CHANGED: Step(State.GONE, (*_THEN, *_FINISH)),
        Event.KEPT: Step(State.BACKOFF),
        Event.CONTAINED: Step(State.BACKOFF, _FAILED),
    },
    State.ASLEEP: {
        Event.DUE: Step(State.STARTING, _WAKE),
        Event.WATCH_FIRED: Step(State.STARTING, _WAKE),
        Event.REMOVED: Step(State.GONE, (*_THEN, *_FINISH)),
        Event.CHANGED: Step(State.GONE, (*_THEN, *_FINISH)),
        Event.KEPT: Step(State.ASLEEP),
        Event.CONTAINED: Step(State.BACKOFF, _FAILED),
    },
    # A stop asked again, or a reload, while a slot stops changes only what follows it (no
    # second SIGTERM, no new grace): a tenant still configured, changed or not, starts anew.
    State.STOPPING: {
        Event.EXITED: Step(State.GONE, (Action.STOPPED, *_FINISH)),
        Event.RETIRED: Step(State.GONE, (Action.STOPPED, *_FINISH)),
        Event.DUE: Step(State.STOPPING, (Action.FORCE,)),
        Event.REMOVED: Step(State.STOPPING, _THEN),
        Event.CHANGED: Step(State.STOPPING, _THEN),
        Event.KEPT: Step(State.STOPPING, _THEN),
        Event.CONTAINED: Step(State.STOPPING, (*_CLEAN, Action.KILL)),
    },
    State.STOPPING_WHILE_FORKING: {
        # Its grace starts with the SIGTERM, once there is a worker to send it to.
        Event.SPAWNED: Step(State.STOPPING, (Action.TERMINATE,)),
        Event.SPAWN_FAILED: Step(State.GONE, _FINISH),
        Event.REMOVED: Step(State.STOPPING_WHILE_FORKING, _THEN),
        Event.CHANGED: Step(State.STOPPING_WHILE_FORKING, _THEN),
        Event.KEPT: Step(State.STOPPING_WHILE_FORKING, _THEN),
        # As in STARTING, the worker is killed when it comes.
        Event.CONTAINED: Step(State.GONE, _FINISH),
    },
    State.GONE: {
        # Only FINISH itself can raise here (removing the namespace), the slot forgotten
        # already: what is left of it is closed again, which costs nothing.
        Event.CONTAINED: Step(State.GONE, _CLEAN),
    },
}

# What cannot happen, by state: a slot is added once; without a worker nothing exits,
# without a request out nothing is spawned, the watch is polled only while asleep, and
# only BACKOFF, ASLEEP and STOPPING have a time due. A slot GONE is in no table of the
# supervisor's any more.
REFUSED: dict[State, frozenset[Event]] = {
    State.NEW: frozenset(set(Event) - {Event.ADDED, Event.CONTAINED}),
    State.STARTING: frozenset(
        {Event.ADDED, Event.EXITED, Event.RETIRED, Event.DUE, Event.WATCH_FIRED}
    ),
    State.RUNNING: frozenset(
        {Event.ADDED, Event.SPAWNED, Event.SPAWN_FAILED, Event.DUE, Event.WATCH_FIRED}
    ),
    State.BACKOFF: frozenset(
        {
            Event.ADDED,
            Event.SPAWNED,
            Event.SPAWN_FAILED,
            Event.EXITED,
            Event.RETIRED,
            Event.WATCH_FIRED,
        }
    ),
    State.ASLEEP: frozenset(
        {Event.ADDED, Event.SPAWNED, Event.SPAWN_FAILED, Event.EXITED, Event.RETIRED}
    ),
    State.STOPPING: frozenset({Event.ADDED, Event.SPAWNED, Event.SPAWN_FAILED, Event.WATCH_FIRED}),
    State.STOPPING_WHILE_FORKING: frozenset(
        {Event.ADDED, Event.EXITED, Event.RETIRED, Event.DUE, Event.WATCH_FIRED}
    ),
    State.GONE: frozenset(set(Event) - {Event.CONTAINED}),
}
