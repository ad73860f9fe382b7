"""The delivery engine (nsmail.tenant.engine) with a fake remote side and a queue of the
test's own: which jobs go, which wait, which are deferred, and that each message is settled
once with one outcome per recipient. No socket: the fake's sessions are futures the test
resolves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from nsmail.core.config import DeliveryConfig, Tenant
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Envelope
from nsmail.core.scheduler import Policy, Result
from nsmail.tenant import engine as engine_module
from nsmail.tenant.engine import Engine
from nsmail.tenant.local import for_tenant
from nsmail.tenant.policies import MAY
from nsmail.tenant.qmgr import Taken
from nsmail.tenant.remote import Route, Sent, Unreached
from nsmail.tenant.spool import INCOMING, Spool

BODY = Message.of(b"Subject: hi\n\nhello\n")


@dataclass
class FakeSession:
    peer: tuple[IPv4Address | IPv6Address, int]
    usable: bool = True

    def abort(self) -> None:
        self.usable = False

    async def quit(self) -> None:
        self.usable = False


@dataclass
class FakeOpened:
    session: FakeSession
    relay: str
    seconds: float = 0.0


@dataclass
class FakeRemote:
    """Destinations by domain: "ok" delivers, "tarpit" never opens, "dead" fails to
    open, "throttle" asks to slow down once, "v6only" refuses over IPv6 for the address."""

    tenant: Tenant
    config: DeliveryConfig
    routed: list[str] = field(default_factory=list)
    opened: list[str] = field(default_factory=list)
    sent: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    throttled: set[str] = field(default_factory=set)

    def policy(self, route: Route) -> Policy:
        return Policy(initial_concurrency=2, concurrency_limit=4, dead_after=2)

    async def route(self, domain: str, family: str | None = None) -> Route:
        self.routed.append(domain)
        return Route(domain, (f"mx.{domain}",), False, (MAY,), family or "any")

    async def open(self, route: Route) -> FakeOpened:
        kind = route.domain.split(".")[0]
        self.opened.append(route.destination)
        if kind == "tarpit":
            await asyncio.Event().wait()  # never greets; only the stop cuts it off
        if kind == "dead":
            raise Unreached(
                "4.4.1 mx.dead.test[198.51.100.9]:25: connection refused", "", None, False
            )
        v6 = kind == "v6refused" and route.family != "ipv4"
        peer = ip_address("2001:db8::25" if v6 else "198.51.100.25")
        return FakeOpened(FakeSession((peer, 25)), f"{route.hosts[0]}[{peer}]:25")

    async def send(
        self, opened: Any, sender: str, recipients: Sequence[str], message: Message, *, kept: bool
    ) -> Sent:
        domain = recipients[0].split("@")[1]
        self.sent.append((domain, tuple(recipients)))
        if domain.startswith("throttle") and domain not in self.throttled:
            self.throttled.add(domain)
            slow = "4.7.28 rate limited (in reply to RCPT TO)"
            return Sent(
                tuple(_outcome(r, Status.TEMPORARY, 421, slow) for r in recipients),
                Result.THROTTLED,
            )
        if domain.startswith("v6refused") and opened.session.peer[0].version == 6:
            refused = tuple(
                Outcome(r, Status.PERMANENT, 550, "5.7.25 no PTR", opened.relay) for r in recipients
            )
            return Sent(refused, Result.DELIVERED, other_family=tuple(recipients))
        done = tuple(
            Outcome(r, Status.DELIVERED, 250, "2.0.0 ok", opened.relay) for r in recipients
        )
        return Sent(done, Result.DELIVERED)


def _outcome(recipient: str, status: Status, code: int, text: str) -> Outcome:
    return Outcome(recipient, status, code, text, "mx.test[198.51.100.25]:25")


class Queue:
    """Messages handed in by the test; what settle was told, per message."""

    next_due = float("inf")

    def __init__(self) -> None:
        self.listed: list[int] = []  # what each `fresh` found
        self.waiting: dict[str, Taken] = {}
        self.settled: dict[str, list[Outcome]] = {}
        self.attempted: dict[str, bool] = {}
        self.changed = asyncio.Event()

    def add(self, queue_id: str, recipients: tuple[str, ...]) -> None:
        envelope = Envelope("alice@tenant.test", recipients, arrival=0.0, cleaned=True)
        self.waiting[queue_id] = Taken(queue_id, envelope, BODY, 0.0, 0.0, contextlib.ExitStack())

    def fresh(self) -> list[tuple[str, str]]:
        self.listed.append(len(self.waiting))
        return [(INCOMING, queue_id) for queue_id in self.waiting]

    def due(self, *, flush: bool = False) -> list[str]:
        return []

    def take(self, state: str, queue_id: str) -> Taken | None:
        return self.waiting.pop(queue_id)

    def settle(
        self,
        taken: Taken,
        outcomes: Sequence[Outcome],
        delays: Any = None,
        *,
        attempted: bool = True,
        retry_at: float | None = None,
    ) -> None:
        assert taken.queue_id not in self.settled, "settled twice"
        self.settled[taken.queue_id] = list(outcomes)
        self.attempted[taken.queue_id] = attempted
        self.changed.set()

    async def until(self, *queue_ids: str) -> None:
        while not set(queue_ids) <= set(self.settled):
            self.changed.clear()
            async with asyncio.timeout(10):
                await self.changed.wait()


def make_engine(tmp_path: Path, active_limit: int = 100) -> tuple[Engine, Queue, FakeRemote]:
    tenant = Tenant(
        domain="tenant.test",
        ipv4=IPv4Address("198.51.100.70"),
        ipv6=IPv6Address("2001:db8:51::70"),
        ehlo="tenant.test",
        uid=0,
        gid=0,
        home=tmp_path,
        users=("alice",),
        source="test",
    )
    remote = FakeRemote(tenant, DeliveryConfig())
    queue = Queue()
    local = for_tenant(tenant, tmp_path, Spool(tmp_path / "spool"), "postmaster@abc.test", None)
    engine = Engine(queue, local, remote, active_limit)  # type: ignore[arg-type]
    return engine, queue, remote


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping waits for tarpits here: a tenth of a second, not twenty."""
    monkeypatch.setattr(engine_module, "STOP_GRACE", 0.1)


def statuses(outcomes: list[Outcome]) -> dict[str, Status]:
    return {o.recipient: o.status for o in outcomes}


def test_a_tarpit_holds_up_no_other_mail(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, _ = make_engine(tmp_path)
        for n in range(3):
            queue.add(f"t{n}", ("x@tarpit.test",))
        for n in range(30):
            queue.add(f"ok{n}", (f"x{n}@ok.test",))
        engine.fill()
        await queue.until(*(f"ok{n}" for n in range(30)))
        assert not any(f"t{n}" in queue.settled for n in range(3))  # still waiting for a greeting
        assert engine.busy
        await engine.stop()

    asyncio.run(run())


def test_local_mail_goes_at_once_whatever_the_rest_waits_for(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, _ = make_engine(tmp_path)
        queue.add("m", ("alice@tenant.test", "x@tarpit.test"))
        engine.fill()
        await asyncio.sleep(0)
        assert list((tmp_path / "mail" / "alice" / "new").iterdir())  # in her Maildir already
        assert "m" not in queue.settled
        await engine.stop()
        assert statuses(queue.settled["m"]) == {
            "alice@tenant.test": Status.DELIVERED,
            "x@tarpit.test": Status.TEMPORARY,
        }

    asyncio.run(run())


def test_stop_defers_what_waits_and_cuts_off_what_runs(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, _ = make_engine(tmp_path)
        for n in range(5):  # two sessions open (the window), three jobs wait behind them
            queue.add(f"t{n}", ("x@tarpit.test",))
        engine.fill()
        await asyncio.sleep(0.01)
        await engine.stop()
        assert sorted(queue.settled) == [f"t{n}" for n in range(5)]
        texts = sorted(o.text.split(";")[0] for n in range(5) for o in queue.settled[f"t{n}"])
        assert (
            texts
            == ["4.3.2 the worker is stopping"] * 3
            + ["4.3.2 the worker stopped during the attempt"] * 2
        )

    asyncio.run(run())


def test_no_more_than_active_limit_messages_are_held(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, _ = make_engine(tmp_path, active_limit=3)
        for n in range(10):
            queue.add(f"t{n}", ("x@tarpit.test",))
        assert engine.fill() == 3
        assert engine.fill() == 0 and len(queue.waiting) == 7
        await engine.stop()

    asyncio.run(run())


def test_a_long_queue_is_listed_once_not_for_every_message_that_ends(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, _ = make_engine(tmp_path, active_limit=10)
        for n in range(100):
            queue.add(f"m{n}", ("x@ok.test",))
        engine.fill()
        while len(queue.settled) < 100:  # as the worker does: fill whenever one ends
            queue.changed.clear()
            async with asyncio.timeout(10):
                await queue.changed.wait()
            engine.fill()
        assert [found for found in queue.listed if found] == [100]
        await engine.stop()

    asyncio.run(run())


def test_mail_for_one_domain_taken_at_once_is_routed_with_one_lookup(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, remote = make_engine(tmp_path)
        for n in range(50):
            queue.add(f"m{n}", ("x@ok.test",))
        engine.fill()
        await queue.until(*(f"m{n}" for n in range(50)))
        assert remote.routed == ["ok.test"]
        await engine.stop()

    asyncio.run(run())


def test_a_message_to_several_domains_goes_to_each_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, remote = make_engine(tmp_path)
        queue.add("m", ("a@ok.test", "b@tarpit.test", "c@other.test"))
        engine.fill()
        await asyncio.sleep(0.01)
        assert sorted(remote.opened) == ["mx.ok.test", "mx.other.test", "mx.tarpit.test"]
        await engine.stop()
        assert statuses(queue.settled["m"]) == {
            "a@ok.test": Status.DELIVERED,
            "b@tarpit.test": Status.TEMPORARY,
            "c@other.test": Status.DELIVERED,
        }

    asyncio.run(run())


def test_a_dead_destination_defers_its_mail_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, remote = make_engine(tmp_path)
        for n in range(10):
            queue.add(f"d{n}", ("x@dead.test",))
        engine.fill()
        await queue.until(*(f"d{n}" for n in range(10)))
        assert len(remote.opened) == 2  # dead after two failures: the rest were not tried
        texts = [queue.settled[f"d{n}"][0].text for n in range(10)]
        assert (
            sum(t.startswith("4.4.1 the mail hosts of dead.test are not answering") for t in texts)
            == 8
        )
        await engine.stop()

    asyncio.run(run())


def test_a_throttle_defers_the_destinations_mail_to_the_end_of_its_pause(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        engine, queue, _ = make_engine(tmp_path)
        queue.add("first", ("x@throttle.test",))
        engine.fill()
        await queue.until("first")
        assert statuses(queue.settled["first"]) == {"x@throttle.test": Status.TEMPORARY}
        assert queue.attempted["first"]  # the slow-down was the answer to an attempt
        (status,) = engine.destinations()
        assert status.state == "throttled"
        queue.add("next", ("y@throttle.test",))
        engine.fill()
        await queue.until("next")
        (waits,) = queue.settled["next"]
        assert waits.text.startswith("4.7.0 the mail hosts of throttle.test asked to slow down")
        assert not queue.attempted["next"]  # not tried: it comes back when the pause ends
        await engine.stop()

    asyncio.run(run())


def test_refused_over_ipv6_goes_again_over_ipv4(tmp_path: Path) -> None:
    async def run() -> None:
        engine, queue, remote = make_engine(tmp_path)
        queue.add("m", ("x@v6refused.test",))
        engine.fill()
        await queue.until("m")
        assert statuses(queue.settled["m"]) == {"x@v6refused.test": Status.DELIVERED}
        assert remote.opened == ["mx.v6refused.test", "mx.v6refused.test/ipv4"]
        await engine.stop()

    asyncio.run(run())
