"""The real delivery engine with a stand-in for the queue, for tests of remote delivery.

`Harness` runs nsmail.tenant.engine (with its scheduler, nsmail.tenant.remote and the
asyncio SMTP sessions) on an event loop of its own thread; `deliver` hands it one message
and returns each recipient's outcome, as the queue manager would be told. Sessions stay
open between messages, as in a worker, until `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

import dns.asyncresolver

from nsmail.core.config import DeliveryConfig, Tenant
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome
from nsmail.core.queuefile import Envelope
from nsmail.tenant.engine import Engine
from nsmail.tenant.local import for_tenant
from nsmail.tenant.qmgr import Delays, Taken
from nsmail.tenant.remote import Remote
from nsmail.tenant.smtp import TlsContexts
from nsmail.tenant.spool import INCOMING, SPOOL_IN_HOME, Spool


def opportunistic() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _Queue:
    """The engine's queue: messages handed in by `Harness.deliver`, outcomes handed back."""

    next_due = float("inf")

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[Taken, asyncio.Future[list[Outcome]]]] = {}

    def fresh(self) -> list[tuple[str, str]]:
        return [(INCOMING, queue_id) for queue_id in self.waiting]

    def due(self, *, flush: bool = False) -> list[str]:
        return []

    def take(self, state: str, queue_id: str) -> Taken | None:
        taken, _ = self.waiting[queue_id]
        return taken

    def settle(
        self,
        taken: Taken,
        outcomes: Sequence[Outcome],
        delays: Any = None,
        *,
        attempted: bool = True,
        retry_at: float | None = None,
    ) -> None:
        _, settled = self.waiting.pop(taken.queue_id)
        settled.set_result(list(outcomes))


class Harness:
    """An engine for `tenant` with `resolver`, on a loop of its own."""

    def __init__(
        self,
        tenant: Tenant,
        config: DeliveryConfig,
        resolver: dns.asyncresolver.Resolver,
        verifying: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        contexts = TlsContexts(opportunistic(), verifying or ssl.create_default_context())
        self.remote = Remote(tenant, config, resolver, contexts, random.Random(0))
        self.queue = _Queue()
        spool = Spool(tenant.home / SPOOL_IN_HOME)
        local = for_tenant(tenant, tenant.home, spool, "postmaster@abc.test", None)
        self.engine = Engine(self.queue, local, self.remote, config.active_limit)
        self.engine.wake = lambda: self.loop.call_soon(self._tick)
        self._timer: asyncio.TimerHandle | None = None
        self.delays: dict[str, Delays] = {}

    def deliver(
        self, queue_id: str, envelope: Envelope, message: Message, timeout: float = 60.0
    ) -> list[Outcome]:
        """Each recipient's outcome of one attempt of `message`."""
        future = asyncio.run_coroutine_threadsafe(
            self._deliver(queue_id, envelope, message), self.loop
        )
        return future.result(timeout)

    async def _deliver(self, queue_id: str, envelope: Envelope, message: Message) -> list[Outcome]:
        taken = Taken(queue_id, envelope, message, 0.0, time.time(), contextlib.ExitStack())
        settled: asyncio.Future[list[Outcome]] = self.loop.create_future()
        self.queue.waiting[queue_id] = (taken, settled)
        self.engine.fill()
        return await settled

    def _tick(self) -> None:
        """What the worker's loop does when woken: the scheduler's timers."""
        self.engine.tick()
        if self._timer is not None:
            self._timer.cancel()
        wakeup = self.engine.next_wakeup()
        if wakeup is not None:
            self._timer = self.loop.call_later(max(0.0, wakeup - time.time()), self._tick)

    def close(self) -> None:
        """Stop the engine (its sessions end with QUIT), then the loop."""
        asyncio.run_coroutine_threadsafe(self.engine.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
