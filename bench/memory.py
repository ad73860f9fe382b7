"""A worker's memory while N messages wait for a dead destination.

One tenant and the real supervisor, with nsmail's default delivery settings, in a lab;
dead.test's MX (`lab.receivers.DEAD`) has addresses where nothing listens, so every
connection is refused. Once the worker runs idle, its private memory (USS, what killing
it would free, as `bench tenants` reads it) is read; then N messages for dead.test are
dropped into its maildrop at once. The worker takes them `active_limit` at a time,
finds the destination dead after `dead_after` refusals, and from then on defers each
message it takes at once, without a connection, until all N are in deferred/. USS is
sampled every SAMPLE seconds meanwhile (its peak), and read again once all N are
deferred (settled): what the worker keeps of mail it does not hold in memory.

Security: benchmark infrastructure, runs as root; everything it makes lives in the lab's
prefixed namespaces and temporary directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hosting import Hosting, TenantSpec, dns_records
from lab import Lab, Nsd
from lab.receivers import DEAD

from bench.arrivals import sender
from bench.tenants import uss_kib
from bench.throughput import NSMAIL_DELIVERY

TENANT = TenantSpec("m0.bench.test", "198.51.100.70", "2001:db8:51::70")
SAMPLE = 0.2  # seconds between USS samples
STATUS_EVERY = 1.0  # seconds between looks at `nsmail status`


def measure_memory(messages: int, log: Callable[[str], None]) -> dict[str, Any]:
    problems: list[str] = []
    with Lab() as lab:
        Nsd(lab, dns_records((TENANT,)) + DEAD.records())
        DEAD.add_to(lab)  # there, so that connections are refused at once, not unanswered
        hosting = Hosting(lab)
        hosting.write_config((TENANT,), **NSMAIL_DELIVERY)
        hosting.start(timeout=60)
        worker = hosting.wait_status(lambda s: s[TENANT.domain]["state"] == "idle")
        pid = worker[TENANT.domain]["pid"]
        time.sleep(1.0)  # let it settle into its idle wait, as `bench tenants` does
        idle = uss_kib(pid)
        log(f"queueing {messages} messages for {DEAD.domain}")
        body = f"From: {sender(TENANT.domain)}\nTo: x@{DEAD.domain}\nSubject: m\n\nm\n".encode()
        started = time.monotonic()
        hosting.enqueue_many(
            TENANT.domain, sender(TENANT.domain), [f"x@{DEAD.domain}"], [body] * messages
        )
        peak, status = idle, worker[TENANT.domain]
        deadline = started + 60 + messages * 0.05
        next_status = 0.0
        while time.monotonic() < deadline:
            peak = max(peak, uss_kib(pid))
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_EVERY
                status = hosting.status()[TENANT.domain]
                if status["queue"]["deferred"] == messages and status["state"] != "delivering":
                    break
            time.sleep(SAMPLE)
        seconds = time.monotonic() - started
        settled = uss_kib(pid)
        if status["queue"]["deferred"] != messages:
            problems.append(f"not all deferred in {seconds:.0f} s: {status['queue']}")
        if status["pid"] != pid:
            problems.append(f"the worker was replaced: {status}")
        if not any(d["state"] == "dead" for d in status["destinations"] or ()):
            problems.append(f"the destination is not shown dead: {status['destinations']}")
        if hosting.stop(timeout=60) != 0:
            problems.append(f"the supervisor did not stop cleanly:\n{hosting.log()}")
    return {
        "messages": messages,
        "seconds_to_defer_all": round(seconds, 1),
        "uss_mib_idle": round(idle / 1024, 2),
        "uss_mib_peak": round(peak / 1024, 2),
        "uss_mib_settled": round(settled / 1024, 2),
        "destinations": status["destinations"],
        "ok": not problems,
        "problems": problems,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"a worker with {report['messages']} messages queued for a dead destination "
        f"(all deferred after {report['seconds_to_defer_all']} s)",
        f"{'USS idle (MiB)':>15} {'peak (MiB)':>11} {'settled (MiB)':>14}",
        f"{report['uss_mib_idle']:>15.2f} {report['uss_mib_peak']:>11.2f} "
        f"{report['uss_mib_settled']:>14.2f}",
    ]
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    return "\n".join(lines)
