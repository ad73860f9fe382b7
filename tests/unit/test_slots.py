"""The supervisor's slot table: every transition walked, and a model of the world around
it (zygote, worker, watch, clock) driven through every state it can reach."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.core.slots import REFUSED, TABLE, Action, Event, Refused, State, Step, step
from nsmail.core.slots import waits_for_time as waits

A, E, S = Action, Event, State

# Behaviours, each a walk from a state: the events in turn, with the state each leads to
# and actions its step must include. Together they walk every transition of the table.
WALKS: dict[str, tuple[State, list[tuple[Event, State, set[Action]]]]] = {
    "a new slot asks for a worker, which starts": (
        S.NEW,
        [(E.ADDED, S.STARTING, {A.START}), (E.SPAWNED, S.RUNNING, {A.STARTED})],
    ),
    "a worker that dies backs off, and starts again when its time comes": (
        S.RUNNING,
        [
            (E.EXITED, S.BACKOFF, {A.CLOSE_CHANNELS, A.COUNT_DEATH, A.BACK_OFF}),
            (E.DUE, S.STARTING, {A.START}),
            (E.SPAWN_FAILED, S.BACKOFF, {A.CLOSE_CHANNELS, A.COUNT_FAILURE, A.BACK_OFF}),
            (E.DUE, S.STARTING, {A.START}),
            (E.SPAWNED, S.RUNNING, {A.STARTED}),
        ],
    ),
    "a retired worker sleeps until mail comes or falls due": (
        S.RUNNING,
        [
            (E.RETIRED, S.ASLEEP, {A.CLOSE_CHANNELS, A.SLEEP}),
            (E.WATCH_FIRED, S.STARTING, {A.DROP_WATCH, A.START}),
            (E.SPAWNED, S.RUNNING, set()),
            (E.RETIRED, S.ASLEEP, {A.SLEEP}),
            (E.DUE, S.STARTING, {A.DROP_WATCH, A.START}),
        ],
    ),
    "a stopped worker has its grace, then SIGKILL, again until it is gone": (
        S.RUNNING,
        [
            (E.REMOVED, S.STOPPING, {A.SET_REPLACEMENT, A.TERMINATE}),
            (E.DUE, S.STOPPING, {A.FORCE}),
            (E.DUE, S.STOPPING, {A.FORCE}),
            (E.EXITED, S.GONE, {A.STOPPED, A.CLOSE_CHANNELS, A.DROP_WATCH, A.FINISH}),
        ],
    ),
    "a changed worker stops, retiring on its way out": (
        S.RUNNING,
        [
            (E.CHANGED, S.STOPPING, {A.SET_REPLACEMENT, A.TERMINATE}),
            (E.RETIRED, S.GONE, {A.DROP_WATCH, A.FINISH}),
        ],
    ),
    "a slot stopped while forking stops its worker as it comes": (
        S.STARTING,
        [
            (E.CHANGED, S.STOPPING_WHILE_FORKING, {A.SET_REPLACEMENT}),
            (E.SPAWNED, S.STOPPING, {A.TERMINATE}),
        ],
    ),
    "a slot stopped while forking is gone if the fork fails": (
        S.STARTING,
        [
            (E.REMOVED, S.STOPPING_WHILE_FORKING, {A.SET_REPLACEMENT}),
            (E.SPAWN_FAILED, S.GONE, {A.CLOSE_CHANNELS, A.FINISH}),
        ],
    ),
    "a slot backing off is removed at once": (
        S.BACKOFF,
        [(E.REMOVED, S.GONE, {A.SET_REPLACEMENT, A.FINISH})],
    ),
    "a slot backing off is changed at once": (
        S.BACKOFF,
        [(E.CHANGED, S.GONE, {A.SET_REPLACEMENT, A.FINISH})],
    ),
    "a slot asleep is removed at once": (
        S.ASLEEP,
        [(E.REMOVED, S.GONE, {A.SET_REPLACEMENT, A.DROP_WATCH, A.FINISH})],
    ),
    "a slot asleep is changed at once": (
        S.ASLEEP,
        [(E.CHANGED, S.GONE, {A.SET_REPLACEMENT, A.DROP_WATCH, A.FINISH})],
    ),
    "a reload that keeps the tenant leaves a live slot alone": (
        S.STARTING,
        [
            (E.KEPT, S.STARTING, set()),
            (E.SPAWNED, S.RUNNING, set()),
            (E.KEPT, S.RUNNING, set()),
            (E.EXITED, S.BACKOFF, set()),
            (E.KEPT, S.BACKOFF, set()),
        ],
    ),
    "a reload that keeps the tenant leaves a sleeping slot alone": (
        S.ASLEEP,
        [(E.KEPT, S.ASLEEP, set())],
    ),
    "a reload or a stop during a stop decides only what follows it": (
        S.STOPPING,
        [
            (E.KEPT, S.STOPPING, {A.SET_REPLACEMENT}),
            (E.REMOVED, S.STOPPING, {A.SET_REPLACEMENT}),
            (E.CHANGED, S.STOPPING, {A.SET_REPLACEMENT}),
        ],
    ),
    "a reload or a stop while forking to stop decides only what follows it": (
        S.STOPPING_WHILE_FORKING,
        [
            (E.KEPT, S.STOPPING_WHILE_FORKING, {A.SET_REPLACEMENT}),
            (E.REMOVED, S.STOPPING_WHILE_FORKING, {A.SET_REPLACEMENT}),
            (E.CHANGED, S.STOPPING_WHILE_FORKING, {A.SET_REPLACEMENT}),
        ],
    ),
    "a contained failure kills the worker, and reaping backs off": (
        S.RUNNING,
        [
            (E.CONTAINED, S.RUNNING, {A.CLOSE_CHANNELS, A.DROP_WATCH, A.KILL}),
            (E.EXITED, S.BACKOFF, {A.COUNT_DEATH, A.BACK_OFF}),
            (E.CONTAINED, S.BACKOFF, {A.COUNT_FAILURE, A.BACK_OFF}),
        ],
    ),
    "a contained failure with no worker backs off at once": (
        S.NEW,
        [
            (E.CONTAINED, S.BACKOFF, {A.COUNT_FAILURE, A.BACK_OFF}),
            (E.DUE, S.STARTING, set()),
            (E.CONTAINED, S.BACKOFF, {A.CLOSE_CHANNELS, A.COUNT_FAILURE, A.BACK_OFF}),
        ],
    ),
    "a contained failure asleep backs off": (
        S.ASLEEP,
        [(E.CONTAINED, S.BACKOFF, {A.DROP_WATCH, A.COUNT_FAILURE, A.BACK_OFF})],
    ),
    "a contained failure while stopping kills the worker, and its stop ends": (
        S.STOPPING,
        [
            (E.CONTAINED, S.STOPPING, {A.CLOSE_CHANNELS, A.KILL}),
            (E.EXITED, S.GONE, {A.FINISH}),
            (E.CONTAINED, S.GONE, {A.CLOSE_CHANNELS, A.DROP_WATCH}),
        ],
    ),
    "a contained failure while forking to stop ends the stop": (
        S.STOPPING_WHILE_FORKING,
        [(E.CONTAINED, S.GONE, {A.CLOSE_CHANNELS, A.FINISH})],
    ),
}


def walked(start: State, events: list[Event]) -> Iterator[tuple[State, Event, Step]]:
    state = start
    for event in events:
        found = step(state, event)
        yield state, event, found
        state = found.state


@pytest.mark.parametrize("name", WALKS)
def test_a_walk_through_the_table(name: str) -> None:
    start, expected = WALKS[name]
    taken = walked(start, [event for event, _, _ in expected])
    for (_, event, found), (_, state, actions) in zip(taken, expected, strict=True):
        assert found.state == state, (event, found)
        assert actions <= set(found.actions), (event, found)


def test_the_walks_take_every_transition() -> None:
    taken = {
        (state, event)
        for start, expected in WALKS.values()
        for state, event, _ in walked(start, [event for event, _, _ in expected])
    }
    assert taken == {(state, event) for state in TABLE for event in TABLE[state]}


def test_every_event_in_every_state_is_a_step_or_refused() -> None:
    for state in State:
        defined, refused = set(TABLE[state]), REFUSED[state]
        assert not defined & refused, state
        assert defined | refused == set(Event), state


def test_a_refused_event_raises() -> None:
    with pytest.raises(Refused, match="spawned cannot happen to a slot running"):
        step(State.RUNNING, Event.SPAWNED)


def test_the_nothing_of_a_reload_that_changes_nothing() -> None:
    for state in (S.STARTING, S.RUNNING, S.BACKOFF, S.ASLEEP):
        assert step(state, E.KEPT) == Step(state)


def test_a_stop_asked_twice_neither_signals_nor_grants_a_new_grace() -> None:
    for state in (S.STOPPING, S.STOPPING_WHILE_FORKING):
        assert step(state, E.REMOVED) == Step(state, (A.SET_REPLACEMENT,))


def test_start_and_finish_come_last() -> None:
    """START's outcome may come back at once as the slot's next event, and FINISH ends
    the slot: no action of the step may follow either."""
    for state in TABLE:
        for event, found in TABLE[state].items():
            for last in (A.START, A.FINISH):
                if last in found.actions:
                    assert found.actions[-1] == last, (state, event)


@given(st.sampled_from(State), st.lists(st.sampled_from(Event), max_size=60))
def test_random_events_are_steps_or_refused_and_a_refusal_is_contained(
    start: State, events: list[Event]
) -> None:
    """Whatever comes in whatever order, each event is a step or Refused, never an
    undefined pair; and the containment the supervisor answers Refused with always is
    a step."""
    state = start
    for event in events:
        try:
            state = step(state, event).state
        except Refused:
            state = step(state, Event.CONTAINED).state


# -- a model of the world around one slot ------------------------------------------


@dataclass(frozen=True, slots=True)
class World:
    """What is real around a slot: its worker, the fork asked for it, its channels, its
    watch, and whether its time is set. The supervisor feeds the events these make."""

    state: State = State.NEW
    worker: bool = False  # a worker process of this slot exists
    forking: bool = False  # the zygote forks for the slot's current request
    channels: bool = False
    watch: bool = False  # registered in the selector
    timed: bool = False  # a due time was set in the slot's current wait


def happenings(world: World) -> Iterator[Event]:
    """The events the world around `world` can bring, as the supervisor would feed them."""
    if world.state == State.NEW:
        yield Event.ADDED
    if world.forking:
        yield from (Event.SPAWNED, Event.SPAWN_FAILED)
    if world.worker:
        yield from (Event.EXITED, Event.RETIRED)
    if waits(world.state):  # as the supervisor's loop asks the table
        yield Event.DUE
    if world.watch:
        yield Event.WATCH_FIRED
    if world.state not in (State.NEW, State.GONE):
        yield from (Event.REMOVED, Event.CHANGED, Event.KEPT)
    yield Event.CONTAINED  # a bug, anywhere (in GONE: removing the namespace raised)


def happen(world: World, event: Event) -> World:
    """`world` after `event` and the step it leads to."""
    assert event not in REFUSED[world.state], f"the world brought a refused {event}"
    if event == Event.SPAWNED:
        world = replace(world, forking=False, worker=True)
    elif event == Event.SPAWN_FAILED:
        world = replace(world, forking=False)
    elif event in (Event.EXITED, Event.RETIRED):
        world = replace(world, worker=False)
    found = step(world.state, event)
    if found.state != world.state:
        world = replace(world, timed=False)  # a new wait needs its own time
    world = replace(world, state=found.state)
    for action in found.actions:
        world = act(world, action)
    return world


def act(world: World, action: Action) -> World:
    match action:
        case Action.START:
            assert not world.worker and not world.forking
            return replace(world, forking=True, channels=True)
        case Action.STARTED:
            assert world.worker
        case Action.SLEEP:
            return replace(world, watch=True, timed=True)
        case Action.TERMINATE | Action.FORCE:
            assert world.worker, "a signal for no worker"
            return replace(world, timed=True)
        case Action.KILL:
            assert world.worker, "a signal for no worker"
        case Action.CLOSE_CHANNELS:
            # A fork still on its way is for closed channels now: the supervisor kills
            # what comes of it, and feeds nothing.
            return replace(world, channels=False, forking=False)
        case Action.DROP_WATCH:
            return replace(world, watch=False)
        case Action.BACK_OFF:
            return replace(world, timed=True)
        case Action.FINISH:
            assert not (world.worker or world.forking or world.channels or world.watch)
    return world


def check(world: World) -> None:
    state = world.state
    assert world.worker == (state in (S.RUNNING, S.STOPPING)), world
    assert world.forking == (state in (S.STARTING, S.STOPPING_WHILE_FORKING)), world
    assert world.watch == (state == S.ASLEEP), world
    assert not world.channels or state in (
        S.STARTING,
        S.RUNNING,
        S.STOPPING,
        S.STOPPING_WHILE_FORKING,
    )
    assert world.timed or not waits(state), f"{state} waits for a time never set"


def reachable() -> dict[World, set[Event]]:
    """Every world the table can lead to from a new slot, with the events it meets."""
    seen: dict[World, set[Event]] = {}
    todo = deque([World()])
    while todo:
        world = todo.popleft()
        if world in seen:
            continue
        seen[world] = set(happenings(world))
        for event in seen[world]:
            after = happen(world, event)
            check(after)
            todo.append(after)
    return seen


def test_the_world_reaches_every_transition_and_no_refusal() -> None:
    met = {(world.state, event) for world, events in reachable().items() for event in events}
    assert met == {(state, event) for state in TABLE for event in TABLE[state]}


def test_every_slot_can_be_stopped_and_then_ends() -> None:
    """From anywhere, once stopped, what the world does of itself (forks answered,
    workers ending, times coming) ends the slot."""
    natural = {Event.SPAWNED, Event.SPAWN_FAILED, Event.EXITED, Event.RETIRED, Event.DUE}
    for world in reachable():
        if world.state in (State.NEW, State.GONE):
            continue
        todo, seen = [happen(world, Event.REMOVED)], set()
        while todo and not any(w.state == State.GONE for w in todo):
            here = todo.pop()
            if here not in seen:
                seen.add(here)
                todo += [happen(here, e) for e in set(happenings(here)) & natural]
        assert todo, f"{world} never ends once stopped"


@given(st.lists(st.integers(min_value=0, max_value=20), max_size=80))
def test_random_happenings_keep_the_world_and_the_table_agreed(choices: list[int]) -> None:
    """Random sequences of what can happen: the table never refuses what the world
    brings, and the world stays as the slot's state says."""
    world = World()
    for choice in choices:
        possible = list(happenings(world))
        world = happen(world, possible[choice % len(possible)])
        check(world)
