"""The delivery engine of a tenant's worker: many messages at once, none behind another.

The queue manager (nsmail.tenant.qmgr) takes a message, its next attempt recorded first,
and settles it once every recipient has an outcome; in between, the engine delivers.
Local recipients (nsmail.tenant.local) are delivered at once, never behind remote mail.
Remote ones are split by domain into jobs, delivered in parallel: each job is routed (MX),
given to its destination in the scheduler (nsmail.core.scheduler), which decides when it
goes and over which session, and sent by nsmail.tenant.remote. A slow or dead destination
holds up only its own jobs. At most `active_limit` messages are held at once; the rest
wait on disk.

On stop, no session is started, jobs not yet under way are deferred at once, and those in
flight have `STOP_GRACE` seconds to finish; then they are cut off and deferred. Nothing is
lost: every message is in active/ with its next attempt recorded until it is settled, and
a cut-off transaction at worst repeats a delivery.

Security: runs as the tenant inside its namespace and chroot; see qmgr and remote for what
it reads and whom it talks to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from nsmail.core import addresses
from nsmail.core.outcome import Outcome, Status
from nsmail.core.scheduler import (
    STOP_GRACE,
    Action,
    Close,
    Defer,
    DestinationStatus,
    Open,
    Policy,
    Reason,
    Result,
    Scheduler,
    Send,
)
from nsmail.tenant.inflight import InFlight
from nsmail.tenant.local import LocalAgent
from nsmail.tenant.qmgr import Delays, Taken
from nsmail.tenant.remote import Opened, Remote, Route, Unreached, Unroutable, bad_address
from nsmail.tenant.spool import DEFERRED

log = logging.getLogger("nsmail.tenant.engine")

BACKLOG_RETRY = 60.0  # seconds before a message its destination had no room for is due


class Queue(Protocol):
    """What the engine needs of the queue (nsmail.tenant.qmgr.QueueManager)."""

    next_due: float

    def fresh(self) -> list[tuple[str, str]]: ...

    def due(self, *, flush: bool = False) -> list[str]: ...

    def take(self, state: str, queue_id: str) -> Taken | None: ...

    def settle(
        self,
        taken: Taken,
        outcomes: Sequence[Outcome],
        delays: Mapping[str, Delays] | None = None,
        *,
        attempted: bool = True,
        retry_at: float | None = None,
    ) -> None: ...


@dataclass(eq=False)
class _Message:
    taken: Taken
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    delays: dict[str, Delays] = field(default_factory=dict)
    jobs: int = 0  # not yet finished
    attempted: bool = False  # any job got as far as an attempt (counts toward backoff)
    not_before: float | None = None  # not attempted: when its destination takes mail again


@dataclass(eq=False)
class Job:
    """One message's recipients at one domain: the scheduler's unit of work."""

    message: _Message
    domain: str
    recipients: tuple[str, ...]
    family: str | None = None  # narrowed to one address family (a retry over the other)
    route: Route | None = None
    created: float = field(default_factory=time.monotonic)
    done: bool = False


class Engine:
    """Runs taken messages through local delivery and the scheduler's sessions."""

    def __init__(
        self,
        queue: Queue,
        local: LocalAgent,
        remote: Remote,
        active_limit: int,
    ) -> None:
        self.queue = queue
        self.local = local
        self.remote = remote
        self.active_limit = active_limit
        # Told when room was made or the scheduler has news: the worker's loop looks again.
        self.wake: Callable[[], None] = lambda: None
        concurrency = remote.tenant.concurrency_in(remote.config)
        self.scheduler: Scheduler[Job] = Scheduler(self._policy_of, concurrency.max_sessions)
        self._policies: dict[str, Policy] = {}
        self._routes: dict[str, Route] = {}  # destination -> the route its sessions open
        # Route lookups in flight: the jobs of a queue full of mail for one domain share
        # one, rather than each routing it before the first is done.
        self._lookups: InFlight[tuple[str, str | None], Route] = InFlight()
        self._sessions: dict[int, Opened] = {}
        self._messages: dict[str, _Message] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fresh: deque[tuple[str, str]] = deque()  # (state, queue id) listed, not taken
        self._deferred: deque[str] = deque()  # due deferred messages not yet taken
        self.stopping = False

    # -- what the worker asks -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether any message is in flight."""
        return bool(self._messages)

    @property
    def sessions(self) -> int:
        return self.scheduler.sessions

    def destinations(self) -> list[DestinationStatus]:
        return self.scheduler.status(time.time())

    def next_wakeup(self) -> float | None:
        return self.scheduler.next_wakeup()

    def tick(self, now: float | None = None) -> None:
        """Carry out what the scheduler's timers say at `now` (default: the clock's)."""
        self._apply(self.scheduler.tick(time.time() if now is None else now))

    def fill(self, *, flush: bool = False, scan: bool = False) -> int:
        """Take what is due while there is room: new mail first (listed again once the
        last listing is all taken, not for every message that ends: a long queue would
        cost a listing each), then deferred mail whose time has come (looked up on `scan`
        or `flush`, and when the last lot is taken)."""
        taken = 0
        if not self._fresh and self._room():
            self._fresh = deque(self.queue.fresh())
        while self._fresh and self._room():
            taken += self._take(*self._fresh.popleft())
        if self._fresh:
            return taken
        if flush or scan or (not self._deferred and time.time() >= self.queue.next_due):
            self._deferred = deque(self.queue.due(flush=flush))
        while self._deferred and self._room():
            taken += self._take(DEFERRED, self._deferred.popleft())
        return taken

    def _room(self) -> bool:
        return not self.stopping and len(self._messages) < self.active_limit

    def _take(self, state: str, queue_id: str) -> int:
        if queue_id in self._messages:
            return 0
        taken = self.queue.take(state, queue_id)
        if taken is None:
            return 0
        self._start(taken)
        return 1

    async def stop(self) -> None:
        """No new session; jobs in flight get STOP_GRACE seconds, then are cut off."""
        self.stopping = True
        self._apply(self.scheduler.stop())
        deadline = time.monotonic() + STOP_GRACE
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        for task in list(self._tasks):
            task.cancel()
        while self._tasks:  # cancelled tasks finish their jobs; closing tasks may follow
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for opened in self._sessions.values():
            opened.session.abort()
        self._sessions.clear()

    # -- messages -------------------------------------------------------------------------

    def _start(self, taken: Taken) -> None:
        message = _Message(taken)
        self._messages[taken.queue_id] = message
        envelope = taken.envelope
        local = tuple(r for r in envelope.recipients if self.local.is_local(r))
        if local:
            # Started now, never behind remote mail (a Maildir write takes milliseconds).
            message.attempted = True
            job = Job(message, self.local.domain, local)
            message.jobs += 1
            self._spawn(self._deliver_locally(job), job)
        remote = [r for r in envelope.recipients if r not in local]
        for domain, recipients in self._by_domain(message, remote).items():
            self._submit(Job(message, domain, tuple(recipients)))
        self._settle_if_done(message)

    def _by_domain(self, message: _Message, recipients: Sequence[str]) -> dict[str, list[str]]:
        """Recipients grouped by lower-case domain; malformed ones, and all of them for a
        malformed sender, get a permanent outcome here."""
        groups: dict[str, list[str]] = {}
        sender_bad = bad_address(message.taken.envelope.sender)
        for recipient in dict.fromkeys(recipients):
            local, domain = addresses.split(recipient)
            if sender_bad:
                text = "5.1.7 bad sender address"
            elif not local or not domain or bad_address(recipient):
                text = "5.1.3 bad recipient address"
            else:
                groups.setdefault(domain.lower(), []).append(recipient)
                continue
            message.attempted = True
            message.outcomes[recipient] = Outcome(recipient, Status.PERMANENT, None, text, "")
        return groups

    async def _deliver_locally(self, job: Job) -> None:
        taken = job.message.taken
        envelope = dataclasses.replace(taken.envelope, recipients=job.recipients)
        self._finish(job, await self.local.deliver(taken.queue_id, envelope, taken.message))

    def _submit(self, job: Job) -> None:
        job.message.jobs += 1
        self._spawn(self._route(job), job)

    async def _route(self, job: Job) -> None:
        try:
            route = await self._lookups.get(
                (job.domain, job.family), lambda: self.remote.route(job.domain, job.family)
            )
        except Unroutable as e:
            self._finish(job, [_failed(r, e.status, e.text) for r in job.recipients])
            return
        job.route = route
        destination = route.destination
        self._routes[destination] = route
        if destination not in self._policies:
            self._policies[destination] = self.remote.policy(route)
        self._apply(self.scheduler.submit(job, destination, time.time()))

    def _policy_of(self, destination: str) -> Policy:
        return self._policies[destination]

    # -- the scheduler's actions ----------------------------------------------------------

    def _apply(self, actions: list[Action[Job]]) -> None:
        for action in actions:
            if isinstance(action, Open):
                self._spawn(self._open(action.session, action.destination, action.job), action.job)
            elif isinstance(action, Send):
                self._spawn(self._send(action.session, action.job, kept=True), action.job)
            elif isinstance(action, Close):
                self._spawn(self._close(action.session), None)
            else:
                self._deferred_job(action)
        if actions:
            self.wake()

    async def _open(self, session: int, destination: str, job: Job) -> None:
        waited = time.monotonic() - job.created
        try:
            opened = await self.remote.open(self._routes[destination])
        except Unroutable as e:  # no MX and no address: the domain takes no mail
            self._finish(job, [_failed(r, e.status, e.text) for r in job.recipients])
            self._apply(self.scheduler.finished(session, job, Result.DELIVERED, False, time.time()))
            return
        except Unreached as e:
            outcomes = [
                _failed(r, Status.TEMPORARY, e.text, e.relay, e.tls) for r in job.recipients
            ]
            self._finish(job, outcomes, Delays(waiting=waited))
            result = Result.THROTTLED if e.throttled else Result.UNREACHABLE
            self._apply(self.scheduler.finished(session, job, result, False, time.time()))
            return
        self._sessions[session] = opened
        await self._transact(session, job, kept=False, waited=waited, connecting=opened.seconds)

    async def _send(self, session: int, job: Job, *, kept: bool) -> None:
        waited = time.monotonic() - job.created
        await self._transact(session, job, kept=kept, waited=waited, connecting=0.0)

    async def _transact(
        self, session: int, job: Job, *, kept: bool, waited: float, connecting: float
    ) -> None:
        opened = self._sessions[session]
        started = time.monotonic()
        message = job.message
        envelope = message.taken.envelope
        try:
            sent = await self.remote.send(
                opened, envelope.sender, job.recipients, message.taken.message, kept=kept
            )
        except OSError as e:  # its queue file: the session was aborted, nothing was taken
            del self._sessions[session]
            text = f"4.3.0 the queue file could not be read: {e.strerror or e}"
            self._finish(job, [_failed(r, Status.TEMPORARY, text) for r in job.recipients])
            self._apply(self.scheduler.finished(session, job, Result.DELIVERED, False, time.time()))
            return
        reusable = opened.session.usable
        if not reusable:
            opened.session.abort()
            del self._sessions[session]
        if sent.result == Result.STALE:
            job.created = time.monotonic()  # it waits again, from now
            self._apply(self.scheduler.finished(session, job, sent.result, False, time.time()))
            return
        if sent.result == Result.THROTTLED and reusable:  # not used again: it goes
            self._spawn(self._quit(opened), None)
            del self._sessions[session]
            reusable = False
        outcomes = list(sent.outcomes)
        if sent.other_family and job.family is None and job.route is not None:
            outcomes = [o for o in outcomes if o.recipient not in sent.other_family]
            job.recipients = tuple(r for r in job.recipients if r not in sent.other_family)
            self._submit(Job(message, job.domain, sent.other_family, family=_other(opened)))
        delays = Delays(waited, connecting, time.monotonic() - started)
        self._finish(job, outcomes, delays)
        self._apply(self.scheduler.finished(session, job, sent.result, reusable, time.time()))

    async def _close(self, session: int) -> None:
        opened = self._sessions.pop(session, None)
        if opened is not None:
            await opened.session.quit()

    async def _quit(self, opened: Opened) -> None:
        await opened.session.quit()

    def _deferred_job(self, defer: Defer[Job]) -> None:
        job, message = defer.job, defer.job.message
        until = defer.until or time.time()
        when = datetime.fromtimestamp(until).strftime("%H:%M:%S")
        if defer.reason == Reason.DEAD:
            text = (
                f"4.4.1 the mail hosts of {job.domain} are not answering; they are tried "
                f"again from {when} (the destination is marked dead)"
            )
            message.attempted = True
        elif defer.reason == Reason.THROTTLED:
            text = (
                f"4.7.0 the mail hosts of {job.domain} asked to slow down; mail for them "
                f"waits until {when}"
            )
            message.not_before = max(message.not_before or 0.0, until)
        elif defer.reason == Reason.BACKLOG:
            text = f"4.4.5 too much mail is waiting for {job.domain}; it goes in turn"
            message.not_before = max(message.not_before or 0.0, time.time() + BACKLOG_RETRY)
        else:
            text = "4.3.2 the worker is stopping; the message goes when it is back"
        self._finish(job, [_failed(r, Status.TEMPORARY, text) for r in job.recipients])

    # -- ends ------------------------------------------------------------------------------

    def _finish(self, job: Job, outcomes: list[Outcome], delays: Delays | None = None) -> None:
        """`job` has its outcomes (some of its recipients may have gone on in another job)."""
        if job.done:
            return
        job.done = True
        message = job.message
        message.jobs -= 1
        missing = set(job.recipients) - {o.recipient for o in outcomes}
        if missing:  # never a message that cannot be settled, whatever went wrong
            outcomes = outcomes + [
                _failed(r, Status.TEMPORARY, "4.3.0 the attempt gave no outcome") for r in missing
            ]
        for outcome in outcomes:
            message.outcomes[outcome.recipient] = outcome
            if delays is not None:
                message.delays[outcome.recipient] = delays
        if delays is not None or any(o.status != Status.TEMPORARY for o in outcomes):
            message.attempted = True
        self._settle_if_done(message)

    def _settle_if_done(self, message: _Message) -> None:
        if message.jobs:
            return
        taken = message.taken
        del self._messages[taken.queue_id]
        outcomes = [message.outcomes[r] for r in taken.envelope.recipients]
        self.queue.settle(
            taken,
            outcomes,
            message.delays,
            attempted=message.attempted,
            retry_at=message.not_before,
        )
        self.wake()

    def _spawn(self, work: Coroutine[Any, Any, None], job: Job | None) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(work, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Coroutine[Any, Any, None], job: Job | None) -> None:
        """One job's trouble (a bug, a cancelled task at stop) ends only that job, and
        never without an outcome."""
        try:
            await work
        except asyncio.CancelledError:
            if job is not None and not job.done:
                text = "4.3.2 the worker stopped during the attempt"
                self._finish(job, [_failed(r, Status.TEMPORARY, text) for r in job.recipients])
            raise
        except Exception:
            log.exception("%s: delivery to %s failed", _queue_id(job), job.domain if job else "-")
            if job is not None and not job.done:
                text = "4.3.0 internal error in the delivery of this message"
                self._finish(job, [_failed(r, Status.TEMPORARY, text) for r in job.recipients])


def _failed(recipient: str, status: Status, text: str, relay: str = "", tls: str = "") -> Outcome:
    return Outcome(recipient, status, None, text, relay, tls)


def _other(opened: Opened) -> str:
    return "ipv4" if opened.session.peer[0].version == 6 else "ipv6"


def _queue_id(job: Job | None) -> str:
    return job.message.taken.queue_id if job is not None else "-"
