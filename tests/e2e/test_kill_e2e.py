"""Crash safety of the mail path: kill -9 the tenant's worker mid-delivery, lose nothing.

1,000 messages wait in one tenant's maildrop when the supervisor starts; while its real
worker takes them in and delivers them to a fair `rude_smtp`, the worker is SIGKILLed
KILLS times (pids from `nsmail status`), each time once the receiver has stored a random
share of the mail, and the supervisor restarts it after its back-off (1, 2, 4, 8, 16 s).
At the end every message was received at least once and the spool is empty; a kill
between the receiver's 250 and the queue update may repeat a message, so duplicates are
counted and printed, not refused. The seed is printed; NSMAIL_KILL_SEED replays it.
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

from nsmail.tenant.spool import SPOOL_IN_HOME, STATES

MESSAGES = 1000
KILLS = 5
TIMEOUT = 120.0  # for every message to arrive; the back-offs alone take 31 s
# States of a worker process that is up: "running" until its first report, then its own.
LIVE = ("running", "idle", "delivering", "backing off")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


class Killer:
    """SIGKILLs the tenant's worker once each of `marks` messages have been received."""

    def __init__(self, hosting: Hosting, marks: list[int]) -> None:
        self.hosting = hosting
        self.marks = marks
        self.killed: list[int] = []
        self.received_at_kill: list[int] = []

    def tick(self, received: int) -> None:
        if len(self.killed) == len(self.marks) or received < self.marks[len(self.killed)]:
            return
        self.hosting.drain_notify()
        worker = self.hosting.status()[DUAL.domain]
        pid = worker["pid"]
        if worker["state"] not in LIVE or pid is None or pid in self.killed:
            return  # still backing off
        # Only a live process of the tenant's uid: never a recycled pid.
        with contextlib.suppress(FileNotFoundError):
            if self.hosting.proc_uid(pid) == self.hosting.uid(DUAL.domain):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                self.received_at_kill.append(received)


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
    hosting.enqueue_many(
        DUAL.domain,
        "alice@bcd.test",
        ["to@rcpt.test"],
        [
            f"From: alice@bcd.test\nSubject: {i}\nMessage-ID: {m}\n\n{i}\n".encode()
            for i, m in enumerate(sent)
        ],
    )
    submitted = time.monotonic() - submitted
    hosting.start()
    started = time.monotonic()
    # Where to kill: 0 is while it takes the maildrop in, before the first delivery.
    rng = random.Random(seed)
    killer = Killer(hosting, sorted(rng.randrange(0, MESSAGES * 9 // 10) for _ in range(KILLS)))

    deadline = started + TIMEOUT
    while time.monotonic() < deadline:
        received = Counter(r["message_id"] for r in server.records())
        if len(killer.killed) == KILLS and all(received[m] for m in sent):
            break
        killer.tick(len(received))
        hosting.drain_notify()
        time.sleep(0.05)
    elapsed = time.monotonic() - started

    records = server.records()
    received = Counter(r["message_id"] for r in records)
    missing = [m for m in sent if not received[m]]
    print(
        f"{MESSAGES} messages queued in {submitted:.1f} s, all received {elapsed:.1f} s"
        f" after the start; kills {len(killer.killed)} at {killer.received_at_kill} received"
        f"; duplicates {len(records) - len(received)}"
        f" ({sum(1 for n in received.values() if n > 1)} messages)"
    )
    context = f"seed {seed}\n{hosting.log()[-4000:]}"
    assert len(killer.killed) == KILLS, f"only {len(killer.killed)} kills; {context}"
    assert not missing, f"{len(missing)} never received, e.g. {missing[:3]}; {context}"
    assert set(received) <= set(sent), "received mail never sent"
    # The last kill's back-off is 16 s; then the restarted worker finds nothing left to do.
    deadline = time.monotonic() + 25
    while (worker := hosting.status()[DUAL.domain])["state"] not in LIVE:
        assert time.monotonic() < deadline, f"no restart: {worker}; {context}"
        hosting.drain_notify()
        time.sleep(0.2)
    assert worker["restarts"] == KILLS, worker
    spool = hosting.home(DUAL.domain) / SPOOL_IN_HOME
    deadline = time.monotonic() + 10
    while (left := [p for s in STATES for p in (spool / s).glob("*")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not left, f"left in the spool: {left[:5]}; {context}"
    assert not (hosting.home(DUAL.domain) / "mail/alice/new").exists(), "a bounce"
    assert "Traceback" not in hosting.log(), context
    assert hosting.stop() == 0
