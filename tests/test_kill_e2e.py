"""Crash safety of the mail path: kill -9 the tenant's worker mid-delivery, lose nothing.

1,000 messages are queued for one tenant while its real worker delivers them to a fair
`rude_smtp`; the worker is SIGKILLed at random moments (pids from `nsmail status`) and
the supervisor restarts it after its back-off (1, 2, 4, 8 s...). At the end every
message was received at least once; a kill between the receiver's 250 and the queue
update may repeat one, so duplicates are counted and printed, not refused. The seed is
printed; NSMAIL_KILL_SEED replays the kill timing.
"""

from __future__ import annotations

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

from nsmail.spool import SPOOL_IN_HOME, STATES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MESSAGES = 1000
KILLS = 5
GAP = (0.3, 1.5)  # seconds of running between a restart and the next kill
TIMEOUT = 80.0


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


class Killer:
    """SIGKILLs the tenant's running worker at random moments, KILLS times."""

    def __init__(self, hosting: Hosting, rng: random.Random) -> None:
        self.hosting = hosting
        self.rng = rng
        self.killed: list[int] = []
        self.due = time.monotonic() + rng.uniform(*GAP)

    def tick(self) -> None:
        if len(self.killed) >= KILLS or time.monotonic() < self.due:
            return
        worker = self.hosting.status()[DUAL.domain]
        pid = worker["pid"]
        if worker["state"] != "running" or pid is None or pid in self.killed:
            return  # still backing off: the gap counts from the restart
        # Only a live process of the tenant's uid: never a recycled pid.
        if self.hosting.proc_uid(pid) != self.hosting.uid(DUAL.domain):
            return
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)
        self.due = time.monotonic() + self.rng.uniform(*GAP)


def test_kill_9_loses_nothing(lab: Lab) -> None:
    seed = int(os.environ.get("NSMAIL_KILL_SEED") or secrets.randbelow(1 << 30))
    print(f"seed {seed}")
    Nsd(lab, dns_records((DUAL,)))
    server = RudeSmtp(lab, seed=seed, mode="fair")
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), scan_interval=0.5, timeout=5, retry_first=1, retry_max=2)
    hosting.start()
    started = time.monotonic()
    killer = Killer(hosting, random.Random(seed))

    run = secrets.token_hex(4)
    sent = [f"<kill-{i}-{run}@{DUAL.domain}>" for i in range(MESSAGES)]
    for i, message_id in enumerate(sent):
        body = f"From: alice@bcd.test\nSubject: kill {i}\nMessage-ID: {message_id}\n\n{i}\n"
        hosting.enqueue(DUAL.domain, "alice@bcd.test", [f"k{i}@rcpt.test"], body.encode())
        killer.tick()
    queued = time.monotonic() - started

    deadline = started + TIMEOUT
    while time.monotonic() < deadline:
        received = Counter(r["message_id"] for r in server.records())
        if len(killer.killed) >= KILLS and all(received[m] for m in sent):
            break
        killer.tick()
        time.sleep(0.1)
    elapsed = time.monotonic() - started

    records = server.records()
    received = Counter(r["message_id"] for r in records)
    missing = [m for m in sent if not received[m]]
    print(
        f"{MESSAGES} messages, queued in {queued:.1f} s, all received in {elapsed:.1f} s"
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
    worker = hosting.status()[DUAL.domain]
    assert (worker["state"], worker["restarts"]) == ("running", KILLS), worker
    assert "Traceback" not in hosting.log(), context
    assert hosting.stop() == 0
