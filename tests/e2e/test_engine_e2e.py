"""The delivery engine against adverse receivers, end to end: the real supervisor and jailed
workers, `nsmail-sendmail`, a real Postfix receiver and NSD, and the lab's tarpit, slow
and dead receivers (`lab.receivers`), all in lab namespaces.

A tarpit holds up only its own mail (the greeting timeout is RFC 5321's five minutes
here, so the tarpit's session is still waiting when the other mail is in); a slow
receiver is given several sessions at once, as it sees them; and `nsmail status --json`
shows the sessions open and, after `dead_after` refused connections, the dead destination.
A session in flight when the supervisor is stopped is let finish (scheduler.STOP_GRACE).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from hosting import DUAL, Hosting, dns_records
from lab import Lab, Nsd, Postfix
from lab.receivers import DEAD, SLOW, TARPIT, SlowSmtp, Tarpit
from polling import wait_for

from nsmail.core.queuefile import decode
from nsmail.tenant.spool import ACTIVE, DEFERRED, SPOOL_IN_HOME

SENDER = f"alice@{DUAL.domain}"
GREETING_TIMEOUT = 300  # RFC 5321 4.5.3.2.1, nsmail's default


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def mail(to: str, subject: str) -> bytes:
    return f"From: {SENDER}\nTo: {to}\nSubject: {subject}\n\n{subject}\n".encode()


def waiting(hosting: Hosting, state: str) -> list[tuple[str, ...]]:
    """The recipients of each message in `state` of the tenant's queue."""
    directory = hosting.home(DUAL.domain) / SPOOL_IN_HOME / state
    found = []
    for name in os.listdir(directory):
        envelope, _ = decode((directory / name).read_bytes())
        found.append(envelope.recipients)
    return found


def test_mail_for_a_healthy_receiver_goes_while_a_tarpit_holds_its_own(lab: Lab) -> None:
    Nsd(lab, dns_records((DUAL,)) + TARPIT.records())
    postfix = Postfix(lab)
    tarpit = Tarpit(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), smtp_helo_timeout=GREETING_TIMEOUT)
    hosting.start()

    hosting.sendmail(DUAL.domain, ["-i", "-f", SENDER, "x@tarpit.test"], mail("x", "tarpit"))
    wait_for(lambda: len(tarpit.connections()) == 1)  # its session waits for a greeting
    hosting.sendmail(DUAL.domain, ["-i", "-f", SENDER, "x1@rcpt.test"], mail("x1", "healthy"))

    (received,) = postfix.wait_for(1, timeout=30)
    assert received["Subject"] == "healthy"
    # ...while the tarpit's message is still being attempted, its session still open.
    assert waiting(hosting, ACTIVE) == [("x@tarpit.test",)]
    assert not waiting(hosting, DEFERRED)
    status = hosting.wait_status(lambda s: s[DUAL.domain]["sessions"] >= 1)
    assert status[DUAL.domain]["state"] == "delivering"
    assert len(tarpit.connections()) == 1
    tarpit.stop()  # its session drops: the message is deferred, and the stop is quick
    wait_for(lambda: waiting(hosting, DEFERRED) == [("x@tarpit.test",)])
    assert hosting.stop() == 0


def test_a_slow_receiver_is_given_several_sessions_at_once(lab: Lab) -> None:
    Nsd(lab, dns_records((DUAL,)) + SLOW.records())
    slow = SlowSmtp(lab, delay=2.0)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start()
    # Hosting.enqueue writes through the spool's tmp/, which a starting worker empties.
    hosting.wait_status(lambda s: s[DUAL.domain]["state"] == "idle")

    count = 20
    bodies = [mail(f"x{n}@slow.test", f"slow {n}") for n in range(count)]
    hosting.enqueue_many(DUAL.domain, SENDER, ["x@slow.test"], bodies)

    # Each transaction takes 2 s at the dot: the worker's sessions to it are open at once.
    status = hosting.wait_status(lambda s: s[DUAL.domain]["sessions"] >= 2, timeout=30)
    assert status[DUAL.domain]["state"] == "delivering"
    wait_for(lambda: slow.count() == count, timeout=60)
    # The receiver saw the destination's initial window (5 sessions) at once, at least.
    assert max(slow.sessions()) >= 5
    for dump in slow.dumped():
        head = dict(
            line.split(": ", 1) for line in dump.read_text().splitlines()[:5] if ": " in line
        )
        assert head["X-Client-Addr"] in (DUAL.ipv4, DUAL.ipv6)
        assert head["X-Helo-Args"] == DUAL.domain
        assert head["X-Mail-Args"] == f"FROM:<{SENDER}>"
    assert hosting.stop() == 0


def test_a_destination_that_refuses_every_connection_is_shown_dead(lab: Lab) -> None:
    Nsd(lab, dns_records((DUAL,)) + DEAD.records())
    DEAD.add_to(lab)  # its addresses exist and nothing listens: connections are refused
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), dead_after=3)
    hosting.start()
    hosting.wait_status(lambda s: s[DUAL.domain]["state"] == "idle")

    bodies = [mail("x@dead.test", f"dead {n}") for n in range(10)]
    hosting.enqueue_many(DUAL.domain, SENDER, ["x@dead.test"], bodies)

    status = hosting.wait_status(
        lambda s: (
            (s[DUAL.domain]["queue"] or {}).get("deferred") == 10
            and bool(s[DUAL.domain]["destinations"])
        )
    )
    (destination,) = status[DUAL.domain]["destinations"]
    assert destination["name"] == DEAD.host
    assert destination["state"] == "dead"
    assert destination["until"] > time.time()  # the next probe, on the retry schedule
    lines = hosting.nsmail("status").stdout.splitlines()
    assert any(line.startswith("  dead for ") and line.endswith(DEAD.host) for line in lines)
    assert hosting.stop() == 0


def test_a_stop_lets_a_session_in_flight_finish(lab: Lab) -> None:
    # The receiver answers the dot after 13 s: longer than a short SIGKILL grace would
    # wait, within the 20 s a worker gives its sessions in flight.
    Nsd(lab, dns_records((DUAL,)) + SLOW.records())
    slow = SlowSmtp(lab, delay=13.0)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), timeout=60)
    hosting.start()
    hosting.wait_status(lambda s: s[DUAL.domain]["state"] == "idle")
    hosting.enqueue_many(DUAL.domain, SENDER, ["x@slow.test"], [mail("x@slow.test", "slow")])
    hosting.wait_status(lambda s: s[DUAL.domain]["sessions"] >= 1, timeout=30)

    assert hosting.stop() == 0
    log = hosting.log()
    assert slow.count() == 1, log
    assert "status=sent" in log, log
    assert "killing it" not in log, log
    assert not waiting(hosting, ACTIVE) and not waiting(hosting, DEFERRED)
