"""The tenant's delivery worker process: prepare before the jail, then serve the queue.

Lifecycle (driven by the supervisor): `prepare` runs in the tenant's network namespace
while the process still sees the host file system, and loads everything that needs a file
(modules, CA certificates, time zone, the DNS resolver); the process is then jailed into
the tenant home, and `Worker.run` serves the queue until SIGTERM: an asyncio loop in which
the delivery engine (`nsmail.tenant.engine`) runs many sessions at once. inotify on the
spool is a hint to look now; the periodic scan is the truth.

A worker with nothing to do for `idle_exit` seconds exits, so an idle tenant costs no
process (a thousand idle tenants would otherwise hold a thousand workers). Before it
goes, it hands the supervisor its inotify descriptor with its last report ("asleep",
and when the next deferred message falls due): the supervisor starts a new worker when
that descriptor becomes readable (mail dropped off, released, a flush asked for) or at
that time, or when a client connects to nsmail's SMTP listeners for it. It does not go
while mail waits for it or lingers in an SMTP session (its own, or a client's it
serves: `nsmail.tenant.smtpd`), nor while mail taken in within the hour still counts
toward a sending limit: a new worker would count it only from the last report, as if
all were taken at that time. A worker of a suspended tenant (`nsmail.core.suspend`)
takes clients' mail in and delivers none of it.

Security: after `prepare`, runs as the tenant uid with no capabilities, chrooted into the
tenant home; everything it reads there is tenant-written (see qmgr, spool).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import pwd
import random
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.name
import dns.rdata
from cryptography.hazmat.backends import default_backend

from nsmail.core import retry
from nsmail.core.config import DeliveryConfig, SmtpdConfig, Tenant
from nsmail.core.report import MAX_NAME, Destination, Report
from nsmail.core.report import encode as encode_report
from nsmail.core.scheduler import State
from nsmail.submit.submission import profile_of
from nsmail.tenant import dkim, inotify, local, smtpd
from nsmail.tenant.engine import Engine
from nsmail.tenant.handoff import Handoffs
from nsmail.tenant.history import History
from nsmail.tenant.policies import CACHE_DIR as POLICY_CACHE
from nsmail.tenant.qmgr import QueueManager
from nsmail.tenant.remote import Remote
from nsmail.tenant.resolver import Resolver, make_resolver, use_relay
from nsmail.tenant.smtp import TlsContexts
from nsmail.tenant.spool import INCOMING, MAILDROP, TMP, Spool
from nsmail.tenant.tlsreports import TlsReports

log = logging.getLogger("nsmail.tenant.worker")
REPORT_EVERY = 10.0  # seconds: a report at least this often
REPORT_AT_MOST = 0.5  # seconds: and no more often than this


@dataclass(frozen=True, slots=True)
class Shared:
    """What every worker uses and may share with its siblings until it writes to it."""

    tls: TlsContexts
    resolver: Resolver
    rng: random.Random


@functools.cache
def preload() -> Shared:
    """Load and build, once, what needs files or is the same for every tenant.

    The zygote calls this in its prelude (`nsmail.root.children`), so every worker shares these
    pages (the CA store alone is about 4 MiB; even building a resolver dirties half a
    megabyte) instead of building its own copy. In a process that did not, `prepare`
    does it.
    """
    dns.rdata.load_all_types()  # type: ignore[no-untyped-call]
    # Codecs and hashes load on first use: use them once now (the idna and punycode codecs
    # with their unicodedata tables, OpenSSL's digests).
    dns.name.from_text("bücher.test").to_unicode()
    hashlib.sha256(b"").hexdigest()
    # cryptography before 40 (Debian 12's 38) imports its OpenSSL backend at first use,
    # which in the jail is too late (DANE's certificate parsing).
    default_backend()
    opportunistic = ssl.create_default_context()
    # RFC 7435 opportunistic TLS: encrypt whenever offered, but MX certificates are rarely
    # valid for the MX name, so not authenticating is better than falling back to plain.
    opportunistic.check_hostname = False
    opportunistic.verify_mode = ssl.CERT_NONE
    return Shared(
        tls=TlsContexts(opportunistic=opportunistic, verifying=ssl.create_default_context()),
        resolver=make_resolver(),
        rng=random.Random(),
    )


def prepare(
    tenant: Tenant,
    delivery: DeliveryConfig,
    dns_channel: socket.socket,
    report_channel: socket.socket | None = None,
    home: Path = Path("/"),
    host_queue: HostQueue | None = None,
    taken: tuple[int, float] = (0, 0.0),
    *,
    host_name: str,
    handoffs: socket.socket | None = None,
    sessions: socket.socket | None = None,
    smtpd_config: SmtpdConfig | None = None,
    suspended: bool = False,
) -> Worker:
    """Load everything the worker needs from files, before the chroot takes them away.

    `home` is the tenant home as seen after the chroot. Called once per worker
    process: the shared resolver and random generator become this worker's own here.
    `host_queue` makes this the worker of the machine's own users' mail. `taken`: how
    many messages the previous worker had taken in within the hour, and when it said so.
    `host_name` is the machine's (its postmaster's domain); `handoffs` the channel for
    what the worker may not write itself (nsmail.tenant.handoff): without it, none.
    `sessions` is the channel SMTP clients' connections come on; `suspended` holds
    every message from delivery.
    """
    shared = preload()
    time.tzset()
    time.localtime()
    use_relay(shared.resolver, dns_channel, delivery.timeout)
    shared.rng.seed()  # siblings forked from one parent must not draw the same numbers
    signer = None
    if tenant.dkim_selector is not None and tenant.dkim_key is not None:
        # Still root and outside the jail: the key file is out of reach after it.
        signer = dkim.load_signer(tenant.domain, tenant.dkim_selector, tenant.dkim_key)
    limits = tenant.limits(delivery)
    spool = Spool(home / tenant.spool_in_home)
    postmaster = f"postmaster@{host_name}"
    queue = QueueManager(
        spool=spool,
        history=History(spool.root),
        domain=tenant.domain,
        foreign_senders=tenant.foreign_senders,
        reporting_mta=tenant.ehlo,
        postmaster=postmaster,
        policy=retry.RetryPolicy(
            first=delivery.retry_first,
            maximum=delivery.retry_max,
            lifetime=delivery.lifetime,
            delay_warning=delivery.delay_warning,
        ),
        rng=shared.rng,
        clock=time.time,
        hourly_limit=limits.hourly,
        recipient_limit=limits.recipients,
        signer=signer,
    )
    queue.carry_over(*taken)
    channel = None if handoffs is None else Handoffs(handoffs, spool.root / TMP)
    if host_queue is not None:
        if channel is None:
            raise ValueError("the host's worker hands its users' mail to their mailboxes")
        accounts = pwd.getpwall()
        queue.owners = {entry.pw_uid: entry.pw_name for entry in accounts}
        queue.tenant_uids = host_queue.tenant_uids
        queue.own_uid = tenant.uid
        agent = local.for_host(tenant, [e.pw_name for e in accounts], spool, channel)
    else:
        agent = local.for_tenant(tenant, home, spool, postmaster, channel)
    reports = None
    if delivery.tls_reports:
        reports = TlsReports(queue.spool, tenant.domain, shared.resolver, signer)
    engine = Engine(
        queue,
        agent,
        Remote(
            tenant,
            delivery,
            shared.resolver,
            shared.tls,
            shared.rng,
            policy_cache=queue.spool.root / POLICY_CACHE,
            reports=reports,
        ),
        delivery.active_limit,
    )
    served = None
    if sessions is not None:
        smtpd_config = smtpd_config or SmtpdConfig()
        profile = profile_of(tenant, delivery)
        profile.spool = str(queue.spool.root)  # as the jail shows it
        logins = queue.owners if queue.owners is not None else {tenant.uid: _name(tenant.uid)}
        bounds = smtpd.Limits(
            smtpd_config.timeout, smtpd_config.client_limit, smtpd_config.session_limit
        )
        served = smtpd.Sessions(sessions, profile, logins, bounds)
    return Worker(
        queue,
        engine,
        delivery.scan_interval,
        report_channel,
        delivery.idle_exit,
        sessions=served,
        suspended=suspended,
    )


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


@dataclass(frozen=True, slots=True)
class HostQueue:
    """What the host's worker knows beyond a tenant's: whose uids are tenants'."""

    tenant_uids: frozenset[int]


class Worker:
    """Serves one tenant's queue until SIGTERM, or until it has nothing to do."""

    def __init__(
        self,
        queue: QueueManager,
        engine: Engine,
        scan_interval: float,
        reports: socket.socket | None = None,
        idle_exit: float = 0.0,
        sessions: smtpd.Sessions | None = None,
        suspended: bool = False,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.suspended = suspended
        self.queue = queue
        self.scan_interval = scan_interval
        self.idle_exit = idle_exit
        self._stopping = False
        self._reports = reports
        self._reported: tuple[float, bytes] = (0.0, b"")
        self._unreported: str | None = None
        self._wake: asyncio.Event | None = None
        self.queue.progress = lambda: self._report("delivering")

    def run(self) -> None:
        """Deliver until SIGTERM (sessions in flight get scheduler.STOP_GRACE to finish), or
        until `idle_exit` seconds without work, once the supervisor took over the watch."""
        spool = self.queue.spool
        spool.create(public_maildrop=self.queue.owners is not None)
        self.queue.recover()
        # The spool root itself for the flush trigger that `sendmail -q` creates.
        watch = inotify.Watch([spool.root / MAILDROP, spool.root / INCOMING, spool.root])
        try:
            asyncio.run(self._serve(watch))
        finally:
            watch.close()

    def _report(self, state: str) -> None:
        """Tell the supervisor how things stand: on change, at least every REPORT_EVERY,
        at most every REPORT_AT_MOST (counting the queue costs six directory listings)."""
        if self._reports is None:
            return
        now = time.time()
        last_time, last_data = self._reported
        if now - last_time < REPORT_AT_MOST:
            self._unreported = state  # sent when the limit allows: see _serve
            return
        self._unreported = None
        data = encode_report(self._state(state, now))
        if data == last_data and now - last_time < REPORT_EVERY:
            return
        try:
            self._reports.send(data, socket.MSG_DONTWAIT)
        except OSError:
            return  # a busy or gone supervisor: the next report says it all again
        self._reported = (now, data)

    def _state(self, state: str, now: float) -> Report:
        engine = self.engine
        unavailable = tuple(
            Destination(_cut(d.name, MAX_NAME), str(d.state), d.until)
            for d in engine.destinations()
            if d.state != State.ACTIVE
        )
        return self.queue.report(
            state,
            now,
            sessions=engine.sessions,
            destinations=unavailable,
            tls_failures=engine.remote.tls_failures,
        )

    def _woken(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_sigterm(self) -> None:
        self._stopping = True
        self._woken()

    async def _serve(self, watch: inotify.Watch) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.engine.wake = self._woken
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_reader(watch.fd, self._on_watch, watch)
        if self.sessions is not None:
            loop.add_reader(self.sessions.channel, self.sessions.on_readable)
        try:
            await self._loop(watch)
        finally:
            if self.sessions is not None:
                loop.remove_reader(self.sessions.channel)
            loop.remove_reader(watch.fd)
            await self.engine.stop()
            loop.remove_signal_handler(signal.SIGTERM)
            if self.engine.remote.reports is not None:
                self.engine.remote.reports.save()

    def _on_watch(self, watch: inotify.Watch) -> None:
        watch.drain()
        self._woken()

    async def _loop(self, watch: inotify.Watch) -> None:
        assert self._wake is not None
        engine = self.engine
        next_scan = 0.0
        busy_at = time.time()
        while not self._stopping:
            now = time.time()
            flush = self.queue.spool.take_flush_request()
            scan = flush or now >= next_scan
            if scan:
                next_scan = now + self.scan_interval
            engine.tick()
            if scan:
                await self._tls_reports()
            # Suspended: nothing is taken, so everything waits in the queue (held).
            if (not self.suspended and engine.fill(flush=flush, scan=scan)) or engine.busy:
                busy_at = time.time()
            if engine.busy:
                state = "delivering"
            else:
                state = "backing off" if self.queue.next_due < float("inf") else "idle"
            self._report(state)
            wait = min(next_scan, self.queue.next_due) - time.time()
            wakeup = engine.next_wakeup()
            if wakeup is not None:
                wait = min(wait, wakeup - time.time())
            if self.idle_exit and not engine.busy and not engine.sessions:
                if self._may_retire(busy_at) and self._retire(watch):
                    return
                # Past it (mail due soon, or counting toward a limit), the scans recheck.
                retire_in = busy_at + self.idle_exit - time.time()
                if retire_in > 0:
                    wait = min(wait, retire_in)
            if self._unreported is not None:  # a report held back by the rate limit
                wait = min(wait, self._reported[0] + REPORT_AT_MOST - time.time())
            self._wake.clear()
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _tls_reports(self) -> None:
        """Save the day's TLS tally now and then; queue earlier days' reports (at each
        scan: they are put in incoming/, taken by the fill that follows)."""
        reports = self.engine.remote.reports
        if reports is None:
            return
        reports.save_if_due()
        try:
            await reports.send_due()
        except OSError as e:  # a full disk: the tally stays, the next scan tries again
            log.error("%s: TLS reports not queued: %s", self.queue.domain, e)

    def _may_retire(self, busy_at: float) -> bool:
        """Whether there has been nothing to do since `busy_at` for `idle_exit` seconds,
        and nothing is due within as long."""
        now = time.time()
        spool = self.queue.spool
        return (
            now - busy_at >= self.idle_exit
            and self.queue.next_due - now >= self.idle_exit
            and not self.queue.counting_toward_a_limit(now)
            and not (self.sessions is not None and self.sessions.active)
            and not spool.ids(MAILDROP)
            and not spool.ids(INCOMING)
        )

    def _retire(self, watch: inotify.Watch) -> bool:
        """Hand the supervisor the watch with the last report; False if it could not be
        told (a busy supervisor), and then the worker stays."""
        if self._reports is None:
            return False
        data = encode_report(self._state("asleep", time.time()))
        try:
            socket.send_fds(self._reports, [data], [watch.fd], socket.MSG_DONTWAIT)
        except OSError:
            return False
        log.info(
            "%s: nothing to do for %.0f s; exiting until there is",
            self.queue.domain,
            self.idle_exit,
        )
        return True


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"
