"""Bring-up and tear-down time of K tenants, and private memory per idle worker.

The real supervisor runs in a lab host namespace (bridge mode) with K tenants, each with
its own uid, home and IPv6 address (the first 200 also get IPv4). Up is the time from
starting `nsmail supervise` to its READY=1 (all namespaces built, all workers forked);
down is SIGTERM to exit, with every namespace and link gone.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hosting import Hosting, TenantSpec
from lab import Lab


def bench_tenants(count: int) -> tuple[TenantSpec, ...]:
    return tuple(
        TenantSpec(
            f"t{i}.bench.test",
            f"198.51.100.{10 + i}" if i < 200 else None,
            f"2001:db8:51::{0x1000 + i:x}",
        )
        for i in range(count)
    )


def uss_kib(pid: int) -> int:
    """Private (unshared) memory of a process: what killing it would free."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


def measure_tenants(count: int) -> dict[str, Any]:
    with Lab() as lab:
        hosting = Hosting(lab)
        hosting.write_config(bench_tenants(count))
        started = time.monotonic()
        hosting.start(timeout=300)
        up = time.monotonic() - started
        time.sleep(1.0)  # let every worker settle into its idle wait
        workers = hosting.status()
        pids = [w["pid"] for w in workers.values()]
        assert len(pids) == count and all(pids), "not every tenant has a worker"
        uss = sum(uss_kib(pid) for pid in pids) / count / 1024
        started = time.monotonic()
        assert hosting.stop(timeout=300) == 0
        down = time.monotonic() - started
        left = [n for n in os.listdir("/run/netns") if n.startswith(lab.prefix + "-")]
        assert not left, f"{len(left)} namespaces left behind"
    return {
        "tenants": count,
        "up_seconds": round(up, 3),
        "down_seconds": round(down, 3),
        "uss_mib_per_idle_worker": round(uss, 3),
    }
