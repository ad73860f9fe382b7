"""Bring-up and tear-down time of K tenants, and the memory an idle tenant costs.

The real supervisor runs in a lab host namespace (bridge mode) with K tenants, each with
its own uid, home and IPv6 address (the first 200 also get IPv4). Up is the time from
starting `nsmail supervise` to its READY=1 (all namespaces built, all workers forked);
down is SIGTERM to exit, with every namespace and link gone.

Memory is measured twice. First the private memory (USS) of an idle worker that is still
running, one second after READY. Then, in a second run with `idle_exit = 1`, once every
worker has exited for want of work: what each tenant then costs is its share of the
supervisor's processes (supervisor, zygote, DNS relay; USS) plus the kernel memory its
namespace and links hold (unreclaimable slab, per-CPU, kernel stacks and page tables,
from /proc/meminfo, against the same figure before the supervisor started).
"""

from __future__ import annotations

import os
import time
from typing import Any

from hosting import Hosting, TenantSpec
from lab import Lab

from bench.processes import tree_pids


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


_KERNEL = ("SUnreclaim", "Percpu", "KernelStack", "PageTables")


def kernel_kib() -> int:
    """Kernel memory that namespaces, links and processes hold (not caches)."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) for k in _KERNEL)


def measure_asleep(count: int) -> tuple[float, float]:
    """KiB per tenant once every worker is asleep: the supervisor's processes' share, and
    the kernel's."""
    with Lab() as lab:
        hosting = Hosting(lab)
        hosting.write_config(bench_tenants(count), idle_exit=1)
        before = kernel_kib()
        hosting.start(timeout=300)
        hosting.wait_status(
            lambda s: all(w["state"] == "asleep" for w in s.values()), timeout=60 + count / 10
        )
        assert hosting.proc is not None
        supervisor = sum(uss_kib(pid) for pid in tree_pids(hosting.proc.pid))
        kernel = kernel_kib() - before
        assert hosting.stop(timeout=300) == 0
    return supervisor / count, kernel / count


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
    supervisor, kernel = measure_asleep(count)
    return {
        "tenants": count,
        "up_seconds": round(up, 3),
        "down_seconds": round(down, 3),
        "uss_mib_per_idle_worker": round(uss, 3),
        "mib_per_asleep_tenant": round((supervisor + kernel) / 1024, 3),
        "kernel_mib_per_asleep_tenant": round(kernel / 1024, 3),
    }
