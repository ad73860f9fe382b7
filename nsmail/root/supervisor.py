"""The root supervisor: one namespace per tenant, and a jailed worker whenever it has work.

It builds every tenant's namespace, has the zygote (`nsmail.root.spawn`) fork the tenant's
worker into it, restarts workers that die (with growing back-off), starts a worker again
when mail comes for a tenant whose worker exited for want of work, applies configuration
changes on SIGHUP or `nsmail tenant add/remove` without disturbing tenants whose
configuration did not change, and on SIGTERM stops every worker and removes everything
it made. A worker for the machine's own users' mail runs beside the tenants', and one
unprivileged DNS relay process serves them all (`nsmail.host.dnsrelay`), pinged and replaced
when it does not answer. Each tenant's slot moves along one table (`nsmail.core.slots`):
this module turns what happens into its events and carries out the steps; workers and the
relay are restarted by one back-off (`nsmail.core.retry.RestartPolicy`).

Security: runs as root and stays single-threaded so that setns() and fork() act on the
whole process. It reads only its own configuration; it never opens files in tenant
homes, and it hears from workers only through the descriptors it handed them: status
reports are bounded and validated (`nsmail.core.report`), and the one descriptor a worker may
hand over, with its last report, is kept only if it is an inotify instance, and is only
polled, never read. Hand-off requests (mail a worker may not write itself: to /var/mail,
to the host's postmaster) are checked by `nsmail.root.handoff`, at most a few at once per
worker; their descriptors go unread to a child the zygote jails as the one who may write.
The control socket serves root and the admin group (`nsmail.root.control`); metrics are
off unless configured; both are served without blocking the loop (`nsmail.root.serving`).
SMTP clients of the local listeners are accepted and named by the kernel here, and handed
unread to their tenant's worker (`nsmail.root.listener`); the supervisor never reads what
they send. No wait exceeds MAX_WAIT, whatever time a report names, and an event handler
that raises ends only that event: work for one tenant is contained to it
(`_for_one_tenant`: its worker is restarted), so no tenant can end the loop that all the
others' workers and namespaces depend on.
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Concatenate, ParamSpec, assert_never

from pyroute2.netlink.exceptions import NetlinkError

from nsmail.core import scheduler, suspend
from nsmail.core.config import (
    Config,
    ConfigError,
    Tenant,
    host_identity,
)
from nsmail.core.handoff import MAX_REQUEST as MAX_HANDOFF
from nsmail.core.report import MAX_REPORT, Report, ReportError
from nsmail.core.report import decode as decode_report
from nsmail.core.retry import RestartPolicy, quick_deaths, restart_delay
from nsmail.core.sessionhandoff import Handoff
from nsmail.core.slots import Action, Event, State, step, waits_for_time
from nsmail.core.status import RelayStatus, ReloadRefusal, WorkerStatus
from nsmail.host import dnsrelay
from nsmail.host.configfile import load
from nsmail.root import brake, children, control, handoff, metrics, nft, serving
from nsmail.root.jail import Identity
from nsmail.root.listener import LocalListeners, SessionChannel, SubmissionFront, refuse
from nsmail.root.netns import HostNetwork, TenantNames
from nsmail.root.spawn import SpawnError, Zygote
from nsmail.root.systemd import notify
from nsmail.submit import submission

log = logging.getLogger("nsmail.root.supervisor")

# Seconds between SIGTERM and SIGKILL for a worker: its sessions in flight get
# scheduler.STOP_GRACE to finish, then it defers the rest and reports.
STOP_GRACE = scheduler.STOP_GRACE + 5.0
# Workers and the DNS relay alike: 1, 2, 4 ... 60 s after quick deaths in a row; one that
# ran 60 s before it died starts back-off afresh.
RESTARTS = RestartPolicy(first=1.0, maximum=60.0, stable_after=60.0)
STATUS_EVERY = 1.0  # seconds between updates of systemd's STATUS= line
# A running worker reports at least every 10 s (worker.REPORT_EVERY) between deliveries;
# one that said nothing for this long is stopped (SIGSTOP), hung, or in a very long
# transaction, and its last report is no longer the truth.
SILENT_AFTER = 60.0
# The longest the loop waits for its next event. epoll takes at most 2^31 ms (24.8 days)
# and selectors raises OverflowError past it; a wait that was due later merely wakes once
# an hour to find nothing due, whatever time a report named.
MAX_WAIT = 3600.0
# The DNS relay is pinged this often, and replaced if it has not answered within
# PING_TIMEOUT (stopped, or hung): every tenant's DNS goes through it.
PING_EVERY = 10.0
PING_TIMEOUT = 3.0


@dataclass
class Slot:
    """One tenant as the supervisor tracks it; its state changes only along its table."""

    tenant: Tenant
    names: TenantNames | None = None
    pid: int | None = None
    state: State = State.NEW
    started: float | None = None
    started_mono: float = 0.0
    restarts: int = 0
    crashes: int = 0
    due: float = 0.0  # monotonic: the next start, or SIGKILL while stopping (waits_for_time)
    last_error: str | None = None
    last_error_at: float | None = None
    relay_end: socket.socket | None = None
    reports: socket.socket | None = None  # the supervisor's end of the worker's reports
    handoffs: socket.socket | None = None  # ... of its hand-off requests (nsmail.root.handoff)
    watch: int | None = None  # the inotify descriptor the worker handed over as it retired
    channel: SessionChannel | None = None  # SMTP clients' connections to its worker
    report: Report | None = None  # the worker's latest valid report
    reported_mono: float = 0.0  # when it came (monotonic)
    refused_reports: int = 0
    refused_logged: float = 0.0
    replacement: Tenant | None = None  # what starts when a stop ends: None removes the slot


_P = ParamSpec("_P")
_TenantWork = Callable[Concatenate["Supervisor", Slot, _P], None]


def _for_one_tenant(work: _TenantWork[_P]) -> _TenantWork[_P]:
    """Whatever goes wrong in work for one tenant stays that tenant's (`_contain`)."""

    @functools.wraps(work)
    def contained(supervisor: Supervisor, slot: Slot, /, *args: _P.args, **kw: _P.kwargs) -> None:
        try:
            work(supervisor, slot, *args, **kw)
        except Exception:
            supervisor._contain(slot)

    return contained


@dataclass
class Relay:
    """The DNS relay process and the supervisor's end of its control channel."""

    pid: int | None = None
    control: socket.socket | None = None
    crashes: int = 0
    restarts: int = 0
    started: float | None = None  # wall clock, for status
    started_mono: float = 0.0
    due: float = 0.0  # monotonic time of the next start, or of SIGKILL while stopping
    starting: bool = False
    check_at: float = float("inf")  # monotonic: the next ping, or the end of the wait for it
    pinged: bool = False  # a ping is out, unanswered
    replaced: str | None = None  # why the supervisor ended it, until it has exited
    last_error: str | None = None
    last_error_at: float | None = None


class Supervisor:
    """`zygote` was started before the supervisor's imports, and `worker_files` is the
    limit on open files that workers keep (`nsmail.root.children.start_zygote`)."""

    def __init__(self, config: Config, zygote: Zygote, worker_files: int) -> None:
        self.config = config
        self.host = HostNetwork(config.network)
        self.slots: dict[str, Slot] = {}
        self.relay = Relay()
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self._signals_r, self._signals_w = socket.socketpair()
        self._servers: list[serving.Server] = []  # the control socket, metrics if on
        self.zygote = zygote
        self._ready = False
        self._last_summary = ""
        self._status_due = float("inf")  # when STATUS= is next brought up to date
        self._refusal: ReloadRefusal | None = None  # the last reload, if it was refused
        self._worker_files = worker_files
        self.handing_off = handoff.InFlight()
        self.listeners: LocalListeners | None = None
        self.front = SubmissionFront(config, self.zygote, self.selector, self._route, RESTARTS)
        # Connections a worker left untaken on its channel, to route again.
        self._leftovers: list[tuple[socket.socket, Handoff]] = []
        self.suspended: dict[str, str] = {}  # domain: why (the automatic brake)

    # -- main loop -------------------------------------------------------------------

    def run(self) -> int:
        self._watch_zygote()
        self._install_signals()
        listener = control.listen(self.config.host.run_dir, self.config.host.admin_gid)
        self.suspended = brake.load(self.config.host.run_dir)
        self._serve(listener, self._answer_control, control.TERMINATOR, control.MAX_REQUEST)
        self._refresh_submission_cache()
        if self.config.host.metrics:
            listener = metrics.listen(self.config.host.metrics)
            self._serve(listener, self._answer_metrics, metrics.TERMINATOR, metrics.MAX_REQUEST)
        stale = self.host.remove_stale()
        if stale:
            log.info("removed %d namespaces and links left by an earlier run", len(stale))
        self._restrict_smtp()
        self._listen_smtp()
        self._start_relay()
        self.front.start()
        for tenant in _identities(self.config):
            self._add(tenant)
        self._notify_when_up()
        try:
            while not (self.stopping and not self.slots and self.relay.pid is None):
                for key, _ in self.selector.select(self._timeout()):
                    self._dispatch(key.data)
                self._dispatch(self._run_due)
                self._dispatch(self._route_leftovers)
        finally:
            self._cleanup()
        log.info("stopped")
        return 0

    @staticmethod
    def _dispatch(handler: Callable[[], None]) -> None:
        """Run one event's handler: whatever it raises is logged and ends that event only,
        never the loop (and with it every tenant's worker and namespace). Work for one
        tenant is contained on its own first (`_for_one_tenant`); this catches the rest."""
        try:
            handler()
        except Exception:
            name = getattr(handler, "__name__", handler)
            log.exception("internal error in %s; carrying on", name)

    def _install_signals(self) -> None:
        self._signals_w.setblocking(False)
        self._signals_r.setblocking(False)
        signal.set_wakeup_fd(self._signals_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)
        self.selector.register(self._signals_r, selectors.EVENT_READ, self._on_signals)

    def _on_signals(self) -> None:
        # Read first: whatever fails below, the signals are taken and the socket drained.
        received: set[int] = set()
        with contextlib.suppress(BlockingIOError):
            received = set(self._signals_r.recv(512))
        # A child's pid reaches us before its exit can: the zygote's intermediate sends
        # it, and the child becomes ours only when that intermediate exits.
        self._on_zygote()
        self._reap()  # SIGCHLDs coalesce; reaping is cheap and idempotent
        if received & {signal.SIGTERM, signal.SIGINT}:
            self.shutdown()  # a reload that came with it would be undone at once
        elif signal.SIGHUP in received:
            self.reload()

    def _serve(
        self, listener: socket.socket, answer: serving.Answer, terminator: bytes, limit: int
    ) -> None:
        self._servers.append(serving.Server(listener, self.selector, answer, terminator, limit))

    def _answer_metrics(self, peer: socket.socket, request: bytes) -> bytes:
        return metrics.respond(request, lambda: metrics.render(self.statuses()))

    def _answer_control(self, peer: socket.socket, request: bytes) -> bytes:
        return control.respond(peer, request, self._handle_request, self.config.host.admin_gid)

    def _timeout(self) -> float | None:
        if self._leftovers:
            return 0.0
        dues = [s.due for s in self.slots.values() if waits_for_time(s.state)]
        dues.append(self._status_due)
        dues.append(self.front.due)
        dues += [server.next_deadline() for server in self._servers]
        if self._relay_due():
            dues.append(self.relay.due)
        elif self.relay.pid is not None:
            dues.append(self.relay.check_at)
        soonest = min(dues)
        if soonest == float("inf"):
            return None
        return min(MAX_WAIT, max(0.0, soonest - time.monotonic()))

    def _run_due(self) -> None:
        now = time.monotonic()
        if self._status_due <= now:
            self._update_status()
        for server in self._servers:
            server.expire(now)
        for slot in list(self.slots.values()):
            if waits_for_time(slot.state) and slot.due <= now:
                self._feed(slot, Event.DUE)
        self._tend_relay(now)
        self.front.tend(now)

    def _tend_relay(self, now: float) -> None:
        """Start, kill or ping the relay, whichever is due."""
        if not self._relay_due():
            if self.relay.pid is not None and self.relay.check_at <= now:
                self._check_relay()
        elif self.relay.due <= now:
            if self.relay.pid is None:
                self._start_relay()
            else:
                self._signal(self.relay.pid, signal.SIGKILL)

    def _relay_due(self) -> bool:
        """Whether the relay waits for a restart, or for SIGKILL after it was told to end."""
        if self.stopping:
            return self.relay.pid is not None
        return self.relay.pid is None and not self.relay.starting

    # -- tenants ---------------------------------------------------------------------
    # Each slot's state changes only along its table (`nsmail.core.slots`): the handlers
    # below turn what happened into an event, `_take` looks up the step, and `_do`
    # carries out its actions.

    def _add(self, tenant: Tenant) -> None:
        slot = Slot(tenant)
        self.slots[tenant.domain] = slot
        self._feed(slot, Event.ADDED)

    @_for_one_tenant
    def _feed(self, slot: Slot, event: Event, why: str = "", tenant: Tenant | None = None) -> None:
        """Take the step `event` leads to; whatever goes wrong on the way is contained."""
        self._take(slot, event, why, tenant)

    def _take(self, slot: Slot, event: Event, why: str, tenant: Tenant | None) -> None:
        """The state changes first: an action's outcome may come back at once as the
        slot's next event (START's SPAWN_FAILED). `why` is the error an event brings,
        `tenant` the configuration that replaces the slot's when its stop is over."""
        found = step(slot.state, event)
        slot.state = found.state
        for action in found.actions:
            self._do(slot, action, why, tenant)

    def _do(self, slot: Slot, action: Action, why: str, tenant: Tenant | None) -> None:
        """Carry out one action of a step (`nsmail.core.slots.Action` says what each is)."""
        now = time.monotonic()
        match action:
            case Action.START:
                self._start(slot)
            case Action.STARTED:
                slot.started, slot.started_mono = time.time(), now
                log.info("%s: worker %d started", slot.tenant.domain, slot.pid)
            case Action.SLEEP:
                self._sleep(slot)
            case Action.TERMINATE:
                self._signal_worker(slot, signal.SIGTERM)
                slot.due = now + STOP_GRACE
            case Action.FORCE:
                log.warning(
                    "%s: worker %d ignored SIGTERM, killing it", slot.tenant.domain, slot.pid
                )
                self._signal_worker(slot, signal.SIGKILL)
                slot.due = now + STOP_GRACE
            case Action.KILL:
                self._signal_worker(slot, signal.SIGKILL)
            case Action.CLOSE_CHANNELS:
                self._close_channels(slot)
            case Action.DROP_WATCH:
                self._drop_watch(slot)
            case Action.COUNT_DEATH:
                slot.crashes = quick_deaths(RESTARTS, slot.crashes, now - slot.started_mono)
                slot.restarts += 1
                slot.started = None
            case Action.COUNT_FAILURE:
                slot.crashes = quick_deaths(RESTARTS, slot.crashes, 0.0)
            case Action.BACK_OFF:
                delay = restart_delay(RESTARTS, slot.crashes)
                slot.last_error, slot.last_error_at = why, time.time()
                slot.due = now + delay
                log.error("%s: %s; next start in %.0f s", slot.tenant.domain, why, delay)
            case Action.SET_REPLACEMENT:
                slot.replacement = tenant
            case Action.STOPPED:
                log.info("%s: %s; stopped", slot.tenant.domain, why)
            case Action.FINISH:
                self._finish(slot)
            case _:
                assert_never(action)

    def _start(self, slot: Slot) -> None:
        tenant = slot.tenant
        try:
            if tenant.is_host:
                _prepare_host_spool(tenant)
            elif slot.names is None:
                slot.names = self.host.create(tenant)
        except (OSError, NetlinkError) as e:
            self._feed(slot, Event.SPAWN_FAILED, f"cannot prepare its namespace or queue: {e}")
            return
        worker_end, slot.relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reporting_end, slot.reports = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handoff_end, slot.handoffs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        slot.channel = SessionChannel()
        slot.reports.setblocking(False)
        slot.handoffs.setblocking(False)
        taken = _taken(slot)  # the new worker goes on counting toward hourly_limit
        slot.report = None
        self.selector.register(slot.reports, selectors.EVENT_READ, partial(self._on_report, slot))
        on_handoff = partial(self._on_handoff, slot)
        self.selector.register(slot.handoffs, selectors.EVENT_READ, on_handoff)
        with worker_end, reporting_end, handoff_end:
            self._hand_to_relay(slot.relay_end)
            tenant_uids = frozenset(t.uid for t in self.config.tenants) if tenant.is_host else None
            self.zygote.request(
                f"nsmail {tenant.domain}",
                Identity(uid=tenant.uid, gid=tenant.gid, root=tenant.home),
                slot.names.path if slot.names else None,
                [
                    worker_end.fileno(),
                    reporting_end.fileno(),
                    handoff_end.fileno(),
                    slot.channel.theirs.fileno(),
                ],
                partial(
                    children.worker_main,
                    tenant,
                    self.config.delivery,
                    self.config.host.name,
                    tenant_uids,
                    taken,
                    self._worker_files,
                    self.config.smtpd,
                    tenant.domain in self.suspended,
                ),
                partial(self._spawned, slot, slot.reports),
            )
        # Take the replies that have come in: bringing up many tenants runs without the
        # main loop, and a full reply queue would stall the zygote.
        self._collect_spawns()

    def _spawned(self, slot: Slot, reports: socket.socket | None, result: int | SpawnError) -> None:
        """The zygote's answer to the request `_start` made with the channel `reports`."""
        if reports is not slot.reports:
            # The slot was contained while its worker was being forked: that worker's
            # channels are closed, and a newer start may be on its way.
            if not isinstance(result, SpawnError):
                self._signal(result, signal.SIGKILL)
        elif isinstance(result, SpawnError):
            self._feed(slot, Event.SPAWN_FAILED, f"cannot start: {result}")
        else:
            slot.pid = result
            self._feed(slot, Event.SPAWNED)

    def _finish(self, slot: Slot) -> None:
        """The slot's stop is over: forget it, remove its namespace, then start its
        replacement, or at shutdown end the relay after the last slot. Forgotten first:
        were the removal to raise, no slot would linger that nothing ever ends (what is
        left of the namespace goes when the supervisor exits)."""
        del self.slots[slot.tenant.domain]
        if slot.names is not None:
            self.host.remove(slot.names)
        if self.stopping:
            if not self.slots:
                self._end_relay()
        elif slot.replacement is not None:
            self._add(slot.replacement)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, _describe(status))

    def _exited(self, pid: int, how: str) -> None:
        if pid == self.zygote.pid:
            self._stop_zygote()
            if not self.stopping:
                log.error("zygote %s; starting a new one", how)
                self._start_zygote()
            return
        if pid == self.relay.pid:
            self._relay_exited(how, ran=time.monotonic() - self.relay.started_mono)
            return
        if self.handing_off.ended(pid):
            if how != _describe(0):
                log.warning("hand-off child %d %s", pid, how)
            return
        slot = next((s for s in self.slots.values() if s.pid == pid), None)
        if slot is not None:
            self._worker_exited(slot, pid, how)
        elif self.front.owns(pid):
            self.front.exited(how)

    def _worker_exited(self, slot: Slot, pid: int, how: str) -> None:
        slot.pid = None
        self._on_report(slot)  # what it said last, "asleep" perhaps, may not be read yet
        retired = slot.watch is not None and how == _describe(0)
        self._feed(slot, Event.RETIRED if retired else Event.EXITED, f"worker {pid} {how}")

    def _sleep(self, slot: Slot) -> None:
        """The worker retired: start the next one when its watch fires or mail falls due."""
        assert slot.report is not None and slot.watch is not None  # they come together
        slot.started = None
        slot.crashes = 0
        fired = partial(self._feed, slot, Event.WATCH_FIRED)
        self.selector.register(slot.watch, selectors.EVENT_READ, fired)
        due = slot.report.next_due
        slot.due = float("inf") if due is None else time.monotonic() + max(0.0, due - time.time())
        log.info("%s: worker asleep until mail arrives or falls due", slot.tenant.domain)

    def _signal_worker(self, slot: Slot, sig: int) -> None:
        # None between reaping and the event it brings: a bug contained then has no
        # worker left to kill.
        if slot.pid is not None:
            self._signal(slot.pid, sig)

    def _drop_watch(self, slot: Slot) -> None:
        if slot.watch is not None:
            self._unregister(slot.watch)  # registered while asleep
            os.close(slot.watch)
            slot.watch = None

    def _close_channels(self, slot: Slot) -> None:
        if slot.channel is not None:
            self._leftovers += slot.channel.leftovers()
            slot.channel.close()
            slot.channel = None
        if slot.relay_end is not None:
            slot.relay_end.close()
            slot.relay_end = None
        for channel in (slot.reports, slot.handoffs):
            if channel is not None:
                self._unregister(channel)
                channel.close()
        slot.reports = slot.handoffs = None

    # -- SMTP clients ----------------------------------------------------------------

    def _listen_smtp(self) -> None:
        if self.listeners is not None:
            self.listeners.close()
        self.listeners = LocalListeners(
            self.config.smtpd, self.config.host.run_dir, self.selector, self._route
        )

    def _restrict_smtp(self) -> None:
        """[host] restrict_smtp: only root and the host's own worker reach remote SMTP
        ports from the host namespace (`nsmail.core.firewall`)."""
        host = self.config.host
        exempt = frozenset({0, host.uid}) if host.restrict_smtp else None
        try:
            self.host.restrict_smtp(exempt)
        except nft.NftError as e:
            log.error("restrict_smtp is not in force: %s", e)
            return
        if exempt is not None:
            log.info(
                "restrict_smtp: remote ports 25, 465 and 587 refused but to uids 0, %d", host.uid
            )

    def _route(self, conn: socket.socket, given: Handoff) -> None:
        """Hand a client's connection to its tenant's worker (waking it), or refuse it."""
        slot = self._slot_of(given)
        if slot is not None and slot.state == State.ASLEEP:
            self._feed(slot, Event.WATCH_FIRED)
        taking = slot is not None and slot.state in (State.STARTING, State.RUNNING)
        if (
            slot is not None
            and taking
            and slot.channel is not None
            and slot.channel.send(conn, given)
        ):
            conn.close()  # the worker has it now
            return
        name = self.config.host.name
        refuse(conn, f"421 4.3.2 {name} cannot take your mail now; try again later")
        log.warning("refused an SMTP client (%s): %s", given.client, _why_not(slot))

    def _slot_of(self, given: Handoff) -> Slot | None:
        """The tenant of a local uid (the host's own for any other user), or of the
        domain a remote client authenticated in."""
        domain = given.domain
        for slot in self.slots.values():
            tenant = slot.tenant
            if domain is not None and not tenant.is_host and tenant.domain == domain:
                return slot
            if domain is None and not tenant.is_host and tenant.uid == given.uid:
                return slot
        if domain is not None:
            return None
        return next((s for s in self.slots.values() if s.tenant.is_host), None)

    def _route_leftovers(self) -> None:
        leftovers, self._leftovers = self._leftovers, []
        for conn, given in leftovers:
            self._route(conn, given)

    def _unregister(self, fileobj: socket.socket | int) -> None:
        """Take `fileobj` out of the selector if it is in (`_contain` cannot know)."""
        with contextlib.suppress(KeyError):
            self.selector.unregister(fileobj)

    def _contain(self, slot: Slot) -> None:
        """Work for `slot` raised (a bug, or input nothing foresaw): log it with the
        tenant and bring the slot back to a state the loop knows, touching no other.

        Its channels and watch are closed, so nothing of its worker calls in again (a
        readable socket whose handler keeps raising would spin the loop); the worker is
        killed, and reaping restarts it after back-off or ends its stop. Without a worker
        the slot backs off now; a worker still being forked is killed when it comes
        (`_spawned`). What the last report said (toward `hourly_limit`) is kept. The
        table says so (`Event.CONTAINED`); taken here outside `_feed`, so that a step
        that raises again ends in `_dispatch` instead of coming back here.
        """
        log.exception("%s: internal error; restarting its worker", slot.tenant.domain)
        self._take(slot, Event.CONTAINED, "internal error in the supervisor (see its log)", None)

    @_for_one_tenant
    def _on_report(self, slot: Slot) -> None:
        """Take what the worker reported; anything but a valid report is refused, counted
        and logged (at most once a minute per worker), and changes nothing."""
        for _ in range(32):  # bounded work per wake-up, whatever a worker sends
            if slot.reports is None:
                return
            try:
                data, ancillary, flags, _ = slot.reports.recvmsg(MAX_REPORT + 1, _ONE_FD)
            except BlockingIOError:
                return
            except OSError:
                data, ancillary, flags = b"", [], 0
            fds = _received_fds(ancillary)
            if not data and not flags and not fds:
                self._close_channels(slot)  # the worker is gone; reaping tells the rest
                return
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ReportError(f"more than {MAX_REPORT} bytes or one descriptor")
                report = decode_report(data, slot.tenant.domain)
                if (report.state == "asleep") != bool(fds) or not all(map(_is_inotify, fds)):
                    raise ReportError("a descriptor comes with an asleep report, and is inotify")
                slot.report = report
                slot.reported_mono = time.monotonic()
                self._brake(slot, report)
                self._status_due = min(self._status_due, time.monotonic() + STATUS_EVERY)
                if fds:
                    if slot.watch is not None:
                        os.close(slot.watch)
                    slot.watch = fds.pop()
            except ReportError as e:
                self._refuse_report(slot, str(e))
            finally:
                for fd in fds:
                    os.close(fd)

    @_for_one_tenant
    def _on_handoff(self, slot: Slot) -> None:
        """Carry out what the worker asks to be handed off (`nsmail.root.handoff`), at
        most MAX_IN_FLIGHT at once; a refusal is answered, and logged."""
        for _ in range(handoff.MAX_IN_FLIGHT * 2):  # bounded work per wake-up
            if slot.handoffs is None:
                return
            try:
                data, fds, flags, _ = socket.recv_fds(
                    slot.handoffs, MAX_HANDOFF + 1, 2, socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data and not fds and not flags:
                self._unregister(slot.handoffs)  # the worker is gone; reaping tells the rest
                return
            try:
                self._hand_off(slot, data, fds, flags)
            finally:
                for fd in fds:
                    os.close(fd)

    def _hand_off(self, slot: Slot, data: bytes, fds: list[int], flags: int) -> None:
        domain = slot.tenant.domain
        limit = self.config.delivery.message_size_limit
        job: handoff.Job | str = "4.3.0 a hand-off request is one datagram with two descriptors"
        if not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            job = handoff.plan(data, fds, slot.tenant, self.config.host, limit)
        if isinstance(job, handoff.Job) and self.handing_off.full(domain):
            job = f"4.3.2 {handoff.MAX_IN_FLIGHT} hand-offs are under way; try again later"
        if isinstance(job, str):
            log.warning("%s: refused a hand-off: %s", domain, job)
            handoff.refuse(fds, job)
            return
        self.handing_off.asked(domain)
        self.zygote.request(
            job.title, job.identity, None, fds, job.target, partial(self._handoff_spawned, domain)
        )

    def _handoff_spawned(self, domain: str, result: int | SpawnError) -> None:
        if isinstance(result, SpawnError):  # its descriptors are gone: the worker sees EOF
            log.error("%s: cannot start a hand-off: %s", domain, result)
            self.handing_off.failed(domain)
        else:
            self.handing_off.forked(domain, result)

    def _brake(self, slot: Slot, report: Report) -> None:
        """Suspend a tenant whose last hour passes its suspend_rate: its worker starts
        again holding every message, until `nsmail tenant resume`."""
        tenant = slot.tenant
        rule = tenant.limits(self.config.delivery).suspend
        if tenant.is_host or rule is None or tenant.domain in self.suspended:
            return
        why = suspend.exceeded(rule, report.hour)
        if why is None:
            return
        self.suspended[tenant.domain] = why
        brake.save(self.config.host.run_dir, self.suspended)
        log.warning(
            "%s: suspended: %s; its mail is held until `nsmail tenant resume %s`",
            tenant.domain,
            why,
            tenant.domain,
        )
        self._feed(slot, Event.CHANGED, tenant=tenant)

    def _resume(self, domain: str) -> dict[str, Any]:
        slot = self.slots.get(domain)
        if domain not in self.suspended or slot is None:
            return {"ok": False, "error": f"{domain} is not suspended"}
        del self.suspended[domain]
        brake.save(self.config.host.run_dir, self.suspended)
        log.info("%s: resumed by the operator; its held mail goes now", domain)
        self._feed(slot, Event.CHANGED, tenant=slot.tenant)
        return {"ok": True}

    def _refuse_report(self, slot: Slot, why: str) -> None:
        slot.refused_reports += 1
        now = time.monotonic()
        if now - slot.refused_logged >= 60:
            slot.refused_logged = now
            log.warning(
                "%s: refused a status report from worker %s (%d so far): %s",
                slot.tenant.domain,
                slot.pid,
                slot.refused_reports,
                why,
            )

    # -- the zygote and the DNS relay --------------------------------------------------

    def _start_zygote(self) -> None:
        self.zygote.start()
        self._watch_zygote()

    def _watch_zygote(self) -> None:
        assert self.zygote.sock is not None
        self.selector.register(self.zygote.sock, selectors.EVENT_READ, self._on_zygote)

    def _stop_zygote(self) -> None:
        if self.zygote.sock is not None:
            self.selector.unregister(self.zygote.sock)
        self.zygote.close()

    def _on_zygote(self) -> None:
        self._collect_spawns()
        self._notify_when_up()

    def _collect_spawns(self) -> None:
        if self.zygote.sock is not None and not self.zygote.collect():
            log.error("the zygote closed its socket")
            self._stop_zygote()  # restarted once it is reaped

    def _notify_when_up(self) -> None:
        if self._ready or any(s.state == State.STARTING for s in self.slots.values()):
            return
        self._ready = True
        notify(READY="1", STATUS=self._summary())
        log.info("supervising %s", self._summary())

    def _start_relay(self) -> None:
        host = self.config.host
        empty = host.run_dir / "empty"
        empty.mkdir(mode=0o755, parents=True, exist_ok=True)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.relay.starting = True
            self.zygote.request(
                "nsmail dnsrelay",
                Identity(uid=host.dns_uid, gid=host.dns_gid, root=empty),
                None,
                [theirs.fileno()],
                partial(children.relay_main, host.resolvers, self.config.delivery.timeout),
                self._relay_spawned,
            )
        # Blocking, so that a relay still starting takes every channel handed to it then
        # (the socket buffer holds a few hundred), but never for longer than a relay may
        # take to answer: a relay that does not read by then is replaced.
        mine.settimeout(PING_TIMEOUT)
        self.relay.control = mine
        self.selector.register(mine, selectors.EVENT_READ, self._on_relay)
        # A restarted relay must serve the workers that are already running.
        for slot in self.slots.values():
            if slot.relay_end is not None:
                self._hand_to_relay(slot.relay_end)

    def _relay_spawned(self, result: int | SpawnError) -> None:
        self.relay.starting = False
        if isinstance(result, SpawnError):
            self._relay_exited(f"could not start: {result}", ran=0.0)
            return
        self.relay.pid = result
        self.relay.started = time.time()
        self.relay.started_mono = time.monotonic()
        self.relay.check_at = time.monotonic() + PING_EVERY
        self.relay.pinged = False
        log.info("dns relay %d started for %s", result, _join(self.config.host.resolvers))

    def _hand_to_relay(self, channel: socket.socket) -> None:
        if self.relay.control is None:
            return  # handed over when the relay starts again
        try:
            dnsrelay.hand_over(self.relay.control, channel)
        except OSError as e:
            self._replace_relay(f"does not take channels ({e})")

    def _check_relay(self) -> None:
        """Ping the relay, or replace it if the last ping went unanswered."""
        if self.relay.pinged or self.relay.control is None:
            self._replace_relay(f"did not answer a ping within {PING_TIMEOUT:.0f} s")
            return
        try:
            dnsrelay.ping(self.relay.control)
        except OSError as e:
            self._replace_relay(f"does not take a ping ({e})")
            return
        self.relay.pinged = True
        self.relay.check_at = time.monotonic() + PING_TIMEOUT

    def _on_relay(self) -> None:
        """The relay answered a ping, or is gone (reaping tells the rest)."""
        if self.relay.control is None:
            return  # closed by an earlier handler of the same wake-up
        try:
            answer = self.relay.control.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            answer = b""
        if not answer:
            self._close_relay_control()  # else readable for ever
        elif answer == dnsrelay.PING and self.relay.pinged:
            self.relay.pinged = False
            self.relay.check_at = time.monotonic() + PING_EVERY

    def _replace_relay(self, why: str) -> None:
        """End a relay that fails the supervisor: reaping starts the next one, which is
        handed every worker's channel again. Closing its control channel ends one still
        starting, and stops handing channels to this one."""
        log.error("dns relay %s %s; ending it", self.relay.pid or "(starting)", why)
        self.relay.replaced = why
        self.relay.check_at = float("inf")
        self._close_relay_control()
        if self.relay.pid is not None:
            self._signal(self.relay.pid, signal.SIGKILL)

    def _close_relay_control(self) -> None:
        if self.relay.control is not None:
            self._unregister(self.relay.control)
            self.relay.control.close()
            self.relay.control = None

    def _relay_exited(self, how: str, ran: float) -> None:
        """The relay ended, or never started (`ran` 0): restart it after back-off."""
        self.relay.pid = None
        self.relay.started = None
        self.relay.starting = False
        self.relay.check_at = float("inf")
        self._close_relay_control()
        if self.stopping:
            return
        self.relay.crashes = quick_deaths(RESTARTS, self.relay.crashes, ran)
        self.relay.restarts += 1
        delay = restart_delay(RESTARTS, self.relay.crashes)
        self.relay.due = time.monotonic() + delay
        self.relay.last_error, self.relay.last_error_at = self.relay.replaced or how, time.time()
        self.relay.replaced = None
        log.error("dns relay %s; next start in %.0f s", how, delay)

    # -- reload and shutdown ---------------------------------------------------------

    def reload(self) -> str | None:
        """Apply the configuration on disk; why it was refused, or None."""
        notify(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))
        refused: str | None
        try:
            new = load(self.config.path)
        except ConfigError as e:
            refused = str(e)
        else:
            refused = "[network] changed; restart the supervisor to apply it"
            if new.network == self.config.network:
                self._apply(new)
                refused = None
        self._refusal = ReloadRefusal(refused, time.time()) if refused else None
        if refused:
            log.error("reload refused, keeping the running configuration: %s", refused)
        self._refresh_submission_cache()
        notify(READY="1", STATUS=self._summary())
        return refused

    def _refresh_submission_cache(self) -> None:
        """What nsmail-sendmail reads instead of the configuration (nsmail.submit.submission)."""
        try:
            if not submission.refresh(str(self.config.path)):
                log.info("submission cache not written: the configuration is not valid")
        except OSError as e:
            log.warning("cannot write the submission cache beside %s: %s", self.config.path, e)

    def _apply(self, new: Config) -> None:
        everything_changed = (new.host, new.delivery, new.smtpd) != (
            self.config.host,
            self.config.delivery,
            self.config.smtpd,
        )
        if new.host.resolvers != self.config.host.resolvers and self.relay.pid is not None:
            self._signal(self.relay.pid, signal.SIGTERM)
        listening = (new.smtpd.local, new.smtpd.socket) != (
            self.config.smtpd.local,
            self.config.smtpd.socket,
        )
        self.config = new
        self._restrict_smtp()
        if listening:
            self._listen_smtp()
        self.front.reconfigure(new)
        wanted = {t.domain: t for t in _identities(new)}
        for domain, slot in list(self.slots.items()):
            tenant = wanted.get(domain)
            if tenant is None:
                log.info("%s: removed from the configuration", domain)
                self._feed(slot, Event.REMOVED)
            elif everything_changed or tenant != slot.tenant:
                log.info("%s: configuration changed, restarting", domain)
                self._feed(slot, Event.CHANGED, tenant=tenant)
            else:
                self._feed(slot, Event.KEPT, tenant=tenant)
        for domain, tenant in wanted.items():
            if domain not in self.slots:
                log.info("%s: added to the configuration", domain)
                self._add(tenant)

    def shutdown(self) -> None:
        if self.stopping:
            return
        log.info("stopping %d workers", len(self.slots))
        notify(STOPPING="1")
        self.stopping = True
        self.front.stop()
        for slot in list(self.slots.values()):
            self._feed(slot, Event.REMOVED)
        if not self.slots:
            self._end_relay()

    def _end_relay(self) -> None:
        # Closing its control channel is the relay's signal to end; SIGTERM backs it up.
        self._close_relay_control()
        if self.relay.pid is not None:
            self._signal(self.relay.pid, signal.SIGTERM)
            self.relay.due = time.monotonic() + STOP_GRACE

    def _cleanup(self) -> None:
        for slot in self.slots.values():
            if slot.pid is not None:
                self._signal(slot.pid, signal.SIGKILL)
            if slot.names is not None:
                self.host.remove(slot.names)
        if self.relay.pid is not None:
            self._signal(self.relay.pid, signal.SIGKILL)
        for server in self._servers:
            server.close()
        if self.listeners is not None:
            self.listeners.close()
        self.front.close()
        for conn, _ in self._leftovers:
            conn.close()
        (self.config.host.run_dir / control.SOCKET_NAME).unlink(missing_ok=True)
        self._stop_zygote()
        if self.host.wait_all_gone(timeout=STOP_GRACE):
            self.host.remove_stale()
        self.host.close()

    # -- status ----------------------------------------------------------------------

    def statuses(self) -> list[WorkerStatus]:
        order = sorted(self.slots.values(), key=lambda s: (not s.tenant.is_host, s.tenant.domain))
        now = time.monotonic()
        return [_status_of(slot, now, self.suspended.get(slot.tenant.domain)) for slot in order]

    def _handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "status":
            return {
                "ok": True,
                "host": self.config.host.name,
                "relay": self._relay_status().to_json(),
                "reload_refused": self._refusal.to_json() if self._refusal else None,
                "workers": [s.to_json() for s in self.statuses()],
            }
        if request["cmd"] == "reload":
            refused = self.reload()
            return {"ok": refused is None, "error": refused}
        if request["cmd"] == "resume" and isinstance(request.get("tenant"), str):
            return self._resume(request["tenant"])
        return {"ok": False, "error": f"unknown command {request['cmd']!r}"}

    def _relay_status(self) -> RelayStatus:
        relay = self.relay
        if self.stopping:
            state = "stopping"
        elif relay.pid is not None:
            state = "running"
        else:
            state = "starting" if relay.starting else "restarting"
        return RelayStatus(
            pid=relay.pid,
            state=state,
            started=relay.started,
            restarts=relay.restarts,
            last_error=relay.last_error,
            last_error_at=relay.last_error_at,
        )

    def _summary(self) -> str:
        tenants = [s for s in self.slots.values() if not s.tenant.is_host]
        running = sum(1 for s in tenants if s.state == State.RUNNING)
        asleep = sum(1 for s in tenants if s.state == State.ASLEEP)
        deferred = sum(s.report.queue["deferred"] for s in self.slots.values() if s.report)
        return (
            f"{running} of {len(tenants)} tenants running, {asleep} asleep,"
            f" {deferred} messages deferred"
        )

    def _update_status(self) -> None:
        """Keep systemd's STATUS= line current (`systemctl status nsmail`), at most once per
        STATUS_EVERY: summing up every worker on each report would cost O(workers²)."""
        self._status_due = float("inf")
        summary = self._summary()
        if summary != self._last_summary:
            self._last_summary = summary
            notify(STATUS=summary)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


_ONE_FD = socket.CMSG_SPACE(array.array("i").itemsize)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _is_inotify(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    except OSError:
        return False


def _status_of(slot: Slot, now: float, suspended: str | None) -> WorkerStatus:
    report = slot.report
    tenant = slot.tenant
    shown = {
        State.BACKOFF: "crashed",
        State.STOPPING: "stopping",
        State.STOPPING_WHILE_FORKING: "stopping",
    }
    state = shown.get(slot.state, str(slot.state))
    if slot.state == State.RUNNING and report is not None:
        state = "silent" if now - slot.reported_mono > SILENT_AFTER else report.state
    if suspended is not None and state not in ("stopping", "crashed"):
        state = "suspended"
    # The latest of the worker's last delivery error and the supervisor's last crash.
    error, error_at = slot.last_error, slot.last_error_at
    if report and report.last_error_at and (error_at is None or report.last_error_at > error_at):
        error, error_at = report.last_error, report.last_error_at
    return WorkerStatus(
        domain=tenant.domain,
        role="host" if tenant.is_host else "tenant",
        namespace=slot.names.namespace if slot.names else None,
        pid=slot.pid,
        uid=tenant.uid,
        state=state,
        ipv4=str(tenant.ipv4) if tenant.ipv4 else None,
        ipv6=str(tenant.ipv6) if tenant.ipv6 else None,
        restarts=slot.restarts,
        started=slot.started,
        queue=dict(report.queue) if report else None,
        total=dict(report.total) if report else None,
        hour=dict(report.hour) if report else None,
        last_error=error,
        last_error_at=error_at,
        last_delivery_at=report.last_delivery_at if report else None,
        refused_reports=slot.refused_reports,
        latency_counts=list(report.latency_counts) if report else None,
        latency_sum=report.latency_sum if report else None,
        sessions=report.sessions if report else None,
        destinations=[asdict(d) for d in report.destinations] if report else None,
        tls_failures=dict(report.tls_failures) if report else None,
        double_bounces=report.double_bounces if report else None,
        suspended=suspended,
    )


def _identities(config: Config) -> list[Tenant]:
    """Everyone who gets a worker: the host's own users' mail first, then each tenant."""
    return [host_identity(config), *config.tenants]


def _prepare_host_spool(host: Tenant) -> None:
    # A path of root's configuration, not a tenant's: root may make it, for host.user.
    host.spool.mkdir(mode=0o755, parents=True, exist_ok=True)
    owner = host.spool.stat()
    if (owner.st_uid, owner.st_gid) != (host.uid, host.gid):
        # Only then: nsmail.service keeps no CAP_CHOWN (the package makes the spool).
        os.chown(host.spool, host.uid, host.gid)


def _taken(slot: Slot) -> tuple[int, float]:
    """What the last worker said it had taken in within the hour, and when (wall clock)."""
    if slot.report is None:
        return 0, 0.0
    return slot.report.taken, time.time() - (time.monotonic() - slot.reported_mono)


def _why_not(slot: Slot | None) -> str:
    if slot is None:
        return "no such tenant"
    if slot.state in (State.STARTING, State.RUNNING):
        return f"{slot.tenant.domain}: its worker has too many connections waiting"
    return f"{slot.tenant.domain}: its worker is {slot.state}"


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _join(items: Any) -> str:
    return ", ".join(str(i) for i in items) or "(none)"
