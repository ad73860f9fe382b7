"""The tenant's delivery worker: watch the spool, deliver each message, settle its file.

Lifecycle (driven by the supervisor): `prepare` runs in the tenant's network namespace
while the process still sees the host file system, and loads everything that needs a file
(modules, CA certificates, time zone, the DNS resolver); the process is then jailed into
the tenant home, and `Worker.run` serves the spool until SIGTERM. The spool holds one
file per message (see queuefile) in tmp/, incoming/ and failed/; a file changes state
only by rename. inotify on incoming/ is a hint to look now; the periodic scan is the truth.

Security: after `prepare`, runs as the tenant uid with no capabilities, chrooted into the
tenant home. Every spool file is tenant-written and decoded by queuefile; a file that does
not decode is moved to failed/ and never stops the others.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import select
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import dns.name
import dns.rdata
import dns.resolver

from nsmail import inotify
from nsmail.config import DeliveryConfig, Tenant
from nsmail.delivery import Agent, Status
from nsmail.queuefile import (
    FAILED,
    INCOMING,
    STATES,
    Envelope,
    QueueFileError,
    decode,
    encode,
    fsync_directory,
    valid_queue_id,
    write_durably,
)
from nsmail.resolver import make_resolver, use_relay

SPOOL_ROOT = Path("/var/spool/nsmail")

log = logging.getLogger("nsmail.worker")


@dataclass(frozen=True, slots=True)
class Shared:
    """What every worker uses and may share with its siblings until it writes to it."""

    tls: ssl.SSLContext
    resolver: dns.resolver.Resolver
    rng: random.Random


@functools.cache
def preload() -> Shared:
    """Load and build, once, what needs files or is the same for every tenant.

    The supervisor calls this before it forks the zygote, so every worker shares these
    pages (the CA store alone is about 4 MiB; even building a resolver dirties half a
    megabyte) instead of building its own copy. In a process that did not, `prepare`
    does it.
    """
    dns.rdata.load_all_types()  # type: ignore[no-untyped-call]
    # Codecs and hashes load on first use: use them once now (the idna and punycode codecs
    # with their unicodedata tables, OpenSSL's digests).
    dns.name.from_text("bücher.test").to_unicode()
    hashlib.sha256(b"").hexdigest()
    tls = ssl.create_default_context()
    # RFC 7435 opportunistic TLS: encrypt whenever offered, but MX certificates are rarely
    # valid for the MX name, so not authenticating is better than falling back to plain.
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    return Shared(tls=tls, resolver=make_resolver(), rng=random.Random())


def prepare(
    tenant: Tenant,
    delivery: DeliveryConfig,
    dns_channel: socket.socket,
    spool_root: Path = SPOOL_ROOT,
) -> Worker:
    """Load everything the worker needs from files, before the chroot takes them away.

    `spool_root` is the spool's path as seen after the chroot. Called once per worker
    process: the shared resolver and random generator become this worker's own here.
    """
    shared = preload()
    time.tzset()
    time.localtime()
    use_relay(shared.resolver, dns_channel, delivery.timeout)
    shared.rng.seed()  # siblings forked from one parent must not draw the same numbers
    agent = Agent(
        tenant=tenant,
        config=delivery,
        resolver=shared.resolver,
        tls=shared.tls,
        rng=shared.rng,
    )
    return Worker(agent, spool_root, delivery.scan_interval)


class Worker:
    """Serves one tenant's spool until SIGTERM."""

    def __init__(self, agent: Agent, spool_root: Path, scan_interval: float) -> None:
        self.agent = agent
        self.spool_root = spool_root
        self.scan_interval = scan_interval
        self._stopping = False
        # Files this worker rewrote itself: their rename into incoming/ is no news.
        self._rewritten: set[str] = set()

    def run(self) -> None:
        """Deliver until SIGTERM; a message being delivered is finished first."""
        for state in STATES:
            (self.spool_root / state).mkdir(mode=0o700, parents=True, exist_ok=True)
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.set_wakeup_fd(wake_write)
        watch = inotify.Watch(self.spool_root / INCOMING)
        try:
            self._serve(watch, wake_read)
        finally:
            signal.set_wakeup_fd(-1)
            watch.close()
            os.close(wake_read)
            os.close(wake_write)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _serve(self, watch: inotify.Watch, wake: int) -> None:
        poller = select.poll()
        poller.register(watch.fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        next_scan = time.monotonic()
        while not self._stopping:
            poller.poll(max(0.0, next_scan - time.monotonic()) * 1000)
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 512)
            names, overflow = watch.read()
            if overflow or time.monotonic() >= next_scan:
                batch = sorted(os.listdir(self.spool_root / INCOMING))
                self._rewritten.clear()
                next_scan = time.monotonic() + self.scan_interval
            else:
                batch = [name for name in names if name not in self._rewritten]
                self._rewritten.difference_update(names)
            for name in batch:
                if self._stopping:
                    return
                self._process(name)

    def _process(self, queue_id: str) -> None:
        if not valid_queue_id(queue_id):
            return
        path = self.spool_root / INCOMING / queue_id
        try:
            data = _read(path)
        except FileNotFoundError:
            return  # settled already (scan and event both named it)
        except OSError as e:
            log.error("%s: cannot read: %s", queue_id, e)
            self._move_to_failed(queue_id)
            return
        try:
            envelope, body = decode(data)
        except QueueFileError as e:
            log.error("%s: damaged queue file, moved to %s/: %s", queue_id, FAILED, e)
            self._move_to_failed(queue_id)
            return
        outcomes = self.agent.deliver(queue_id, envelope, body)
        pending = tuple(o.recipient for o in outcomes if o.status == Status.TEMPORARY)
        if pending:
            if len(pending) < len(envelope.recipients):
                remaining = Envelope(sender=envelope.sender, recipients=pending)
                write_durably(self.spool_root, queue_id, encode(remaining, body))
                self._rewritten.add(queue_id)
        elif any(o.status == Status.PERMANENT for o in outcomes):
            self._move_to_failed(queue_id)
        else:
            path.unlink()
            fsync_directory(path.parent)

    def _move_to_failed(self, queue_id: str) -> None:
        os.rename(self.spool_root / INCOMING / queue_id, self.spool_root / FAILED / queue_id)
        fsync_directory(self.spool_root / FAILED)


def _read(path: Path) -> bytes:
    # O_NOFOLLOW: a symlink planted in incoming/ is not followed (ELOOP, then failed/).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()
