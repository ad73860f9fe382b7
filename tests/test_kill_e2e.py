"""Crash safety of the mail path: kill -9 the tenant's worker mid-delivery, lose nothing.

1,000 messages wait in one tenant's maildrop when the supervisor starts; while its real
worker takes them in and delivers them to a fair `rude_smtp`, the worker is SIGKILLed at
random moments (pids from `nsmail status`) and the supervisor restarts it after its
back-off (1, 2, 4, 8 s...). At the end every
message was received at least once; a kill between the receiver's 250 and the queue
update may repeat one, so duplicates are counted and printed, not refused. The seed is
printed; NSMAIL_KILL_SEED replays the kill timing.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hosting import DUAL, Hosting, dns_records
from lab import Lab, Nsd
from rude_smtp import RudeSmtp

from nsmail.queuefile import Envelope, encode
from nsmail.spool import MAILDROP, SPOOL_IN_HOME, STATES, Spool, new_queue_id

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MESSAGES = 1000
KILLS = 5
GAP = (0.3, 3.0)  # seconds of running between a restart and the next kill
TIMEOUT = 80.0
LIVE = ("running", "idle", "delivering")  # states of a worker process that is up


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def drain_notify(hosting: Hosting) -> None:
    """Read the supervisor's sd_notify messages: `Hosting` reads them only until READY=1,
    and with 10 unread (net.unix.max_dgram_qlen) its next STATUS= blocks the supervisor."""
    sock = hosting._notify
    assert sock is not None
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while sock.recv(4096):
            pass


def submit(hosting: Hosting, messages: list[bytes]) -> None:
    """Drop `messages` into the tenant's maildrop as its own uid, as sendmail would; like
    `Hosting.enqueue`, but one process for all of them (a fork each takes half a minute)."""
    uid = hosting.uid(DUAL.domain)
    spool = Spool(hosting.home(DUAL.domain) / SPOOL_IN_HOME)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            spool.create()
            for body in messages:
                envelope = Envelope(
                    "alice@bcd.test", ("to@rcpt.test",), arrival=time.time(), submitter="alice"
                )
                spool.put(MAILDROP, new_queue_id(time.time()), encode(envelope, body))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "enqueue failed"


class Killer:
    """SIGKILLs the tenant's worker KILLS times, each a random GAP after it was seen running."""

    def __init__(self, hosting: Hosting, rng: random.Random) -> None:
        self.hosting = hosting
        self.rng = rng
        self.killed: list[int] = []
        self.times: list[float] = []  # wall clock of each kill
        self.target: int | None = None  # the running worker, once seen
        self.due = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if len(self.killed) >= KILLS or now < self.due:
            return
        drain_notify(self.hosting)
        worker = self.hosting.status()[DUAL.domain]
        pid = worker["pid"]
        if worker["state"] not in LIVE or pid is None or pid in self.killed:
            return  # still backing off
        if pid != self.target:
            self.target = pid
            self.due = now + self.rng.uniform(*GAP)
            return
        # Only a live process of the tenant's uid: never a recycled pid.
        with contextlib.suppress(FileNotFoundError):
            if self.hosting.proc_uid(pid) == self.hosting.uid(DUAL.domain):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                self.times.append(time.time())


def test_kill_9_loses_nothing(lab: Lab) -> None:
    seed = int(os.environ.get("NSMAIL_KILL_SEED") or secrets.randbelow(1 << 30))
    print(f"seed {seed}")
    Nsd(lab, dns_records((DUAL,)))
    server = RudeSmtp(lab, seed=seed, mode="fair")
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), scan_interval=0.5, timeout=5, retry_first=1, retry_max=2)
    submitted = time.monotonic()
    run = secrets.token_hex(4)
    sent = [f"<kill-{i}-{run}@{DUAL.domain}>" for i in range(MESSAGES)]
    submit(
        hosting,
        [
            f"From: alice@bcd.test\nSubject: {i}\nMessage-ID: {m}\n\n{i}\n".encode()
            for i, m in enumerate(sent)
        ],
    )
    submitted = time.monotonic() - submitted
    hosting.start()
    started = time.monotonic()
    killer = Killer(hosting, random.Random(seed))

    deadline = started + TIMEOUT
    while time.monotonic() < deadline:
        received = Counter(r["message_id"] for r in server.records())
        if len(killer.killed) >= KILLS and all(received[m] for m in sent):
            break
        killer.tick()
        drain_notify(hosting)
        time.sleep(0.1)
    elapsed = time.monotonic() - started

    records = server.records()
    received = Counter(r["message_id"] for r in records)
    missing = [m for m in sent if not received[m]]
    progress = [sum(1 for r in records if r["at"] < t) for t in killer.times]
    print(
        f"{MESSAGES} messages queued in {submitted:.1f} s, all received {elapsed:.1f} s"
        f" after the start; received before each kill {progress}"
        f"; kills {len(killer.killed)}; duplicates {len(records) - len(received)}"
        f" ({sum(1 for n in received.values() if n > 1)} messages)"
    )
    context = f"seed {seed}\n{hosting.log()[-4000:]}"
    assert len(killer.killed) == KILLS, f"only {len(killer.killed)} kills; {context}"
    assert not missing, f"{len(missing)} never received, e.g. {missing[:3]}; {context}"
    assert set(received) <= set(sent), "received mail never sent"
    spool = hosting.home(DUAL.domain) / SPOOL_IN_HOME
    deadline = time.monotonic() + 10
    while (left := [p for s in STATES for p in (spool / s).glob("*")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not left, f"left in the spool: {left[:5]}; {context}"
    assert not (hosting.home(DUAL.domain) / "mail/alice/new").exists(), "a bounce"
    drain_notify(hosting)
    worker = hosting.status()[DUAL.domain]
    assert worker["state"] in LIVE and worker["restarts"] == KILLS, worker
    assert "Traceback" not in hosting.log(), context
    assert hosting.stop() == 0
