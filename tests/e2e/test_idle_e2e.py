"""Idle workers exit and come back: an idle tenant costs no process (`idle_exit`).

The real supervisor, workers, `nsmail-sendmail`, Postfix and NSD in lab namespaces: a
worker with nothing to do exits after `idle_exit`, keeping its namespace; mail dropped
off, a local recipient, a deferred message falling due and `sendmail -q` each bring a new
worker, which delivers under the tenant's identity, while the other tenants sleep on."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from hosting import DUAL, V6_ONLY, Hosting, dns_records
from lab import Lab, Nsd, Postfix
from polling import wait_for
from procfs import cpu_seconds

from nsmail.tenant.spool import new_queue_id

IDLE = {"idle_exit": 1, "scan_interval": 0.5}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def asleep(hosting: Hosting, *domains: str, deferred: int = 0) -> dict[str, dict[str, object]]:
    """The status once every one of `domains` has no worker and sleeps."""
    return hosting.wait_status(
        lambda s: all(
            s[d]["state"] == "asleep"
            and s[d]["pid"] is None
            and (s[d]["queue"] or {}).get("deferred") == deferred
            for d in domains
        )
    )


def test_an_idle_worker_exits_and_mail_brings_a_new_one(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V6_ONLY), **IDLE)
    hosting.start()
    status = asleep(hosting, DUAL.domain, V6_ONLY.domain)
    assert status[DUAL.domain]["namespace"]  # the namespace stays: only the process goes
    assert "asleep" in hosting.log()

    hosting.sendmail(DUAL.domain, ["-i", "-f", "alice@bcd.test", "x1@rcpt.test"], b"\n")
    (message,) = postfix.wait_for(1)
    received = " ".join(str(message["Received"]).split())
    assert received.startswith("from bcd.test (bcd.test [IPv6:2001:db8:51::70])")
    # The other tenant was not woken.
    assert hosting.status()[V6_ONLY.domain]["pid"] is None

    # Back to sleep; a local recipient and `sendmail -q` wake it as well.
    status = asleep(hosting, DUAL.domain)
    assert status[DUAL.domain]["total"] == {"sent": 1, "deferred": 0, "bounced": 0}
    hosting.sendmail(DUAL.domain, ["-i", "bob@bcd.test"], b"Subject: local\n\nhi\n")
    wait_for(lambda: hosting.maildir(DUAL.domain, "bob"))
    asleep(hosting, DUAL.domain)
    hosting.sendmail(DUAL.domain, ["-q"], b"")
    hosting.wait_status(lambda s: s[DUAL.domain]["pid"] is not None)
    asleep(hosting, DUAL.domain)
    assert hosting.status()[DUAL.domain]["restarts"] == 0  # sleeping is not crashing
    assert hosting.stop() == 0


def test_a_deferred_message_wakes_its_worker_when_it_falls_due(lab: Lab) -> None:
    Nsd(lab, dns_records())
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), **IDLE, retry_first=4, retry_max=4)
    hosting.start()
    asleep(hosting, DUAL.domain)
    # No receiver yet: the attempt fails, and the worker sleeps with the message deferred.
    hosting.sendmail(DUAL.domain, ["-i", "-f", "alice@bcd.test", "x1@rcpt.test"], b"\n")
    asleep(hosting, DUAL.domain, deferred=1)
    postfix = Postfix(lab)
    # Nothing arrives to wake it: the supervisor does, when the message falls due.
    postfix.wait_for(1, timeout=30)
    asleep(hosting, DUAL.domain)
    assert hosting.stop() == 0


def test_a_worker_that_may_not_retire_yet_waits_without_spinning(lab: Lab) -> None:
    """Idle for `idle_exit` but a deferred message due sooner: it stays, and sleeps in
    poll(2) until then, instead of looping on a wait that is already over."""
    Nsd(lab, dns_records())
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), idle_exit=2, scan_interval=60, retry_first=3, retry_max=3)
    hosting.start()
    hosting.sendmail(DUAL.domain, ["-i", "-f", "alice@bcd.test", "x1@rcpt.test"], b"\n")
    status = hosting.wait_status(lambda s: (s[DUAL.domain]["queue"] or {}).get("deferred") == 1)
    pid = status[DUAL.domain]["pid"]
    assert isinstance(pid, int)
    before = cpu_seconds(pid)
    time.sleep(6)  # two retries, each with a second past idle_exit before it
    assert hosting.status()[DUAL.domain]["pid"] == pid
    assert cpu_seconds(pid) - before < 0.5
    assert hosting.stop() == 0


def test_a_directory_planted_in_the_host_maildrop_does_not_keep_its_worker_up(lab: Lab) -> None:
    """Any local user may create a directory in the host's public maildrop (mode 1733),
    and the host's worker cannot move it to corrupt/ (that takes write access to the
    directory itself). It is no message: the worker retires all the same."""
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), **IDLE)
    hosting.start()
    stranger = hosting.uid_base + 999
    planted = hosting.host_spool / "maildrop" / new_queue_id(time.time())
    wait_for(planted.parent.exists)  # made by the host's worker as it starts
    made = subprocess.run(
        ["mkdir", planted], user=stranger, group=stranger, extra_groups=[], check=False
    )
    assert made.returncode == 0
    wait_for(lambda: hosting.host_status()["state"] == "asleep")
    assert planted.is_dir()
    assert hosting.stop() == 0
