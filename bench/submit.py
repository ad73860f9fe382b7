"""Submitting the benchmarks' messages through a system's own sendmail command.

`python -m bench submit SPEC` runs one submitter per tenant in parallel, each running the
sendmail command as the tenant's uid for one message after the other, and prints the
times as JSON. It is a process of its own so that, for Postfix, it can live in the
baseline's private mount namespace (`SendingPostfix.wrap`).

Security: benchmark infrastructure, runs as root and runs the sendmail commands as the
tenants' uids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.arrivals import message, name_of, sender


@dataclass(frozen=True, slots=True)
class Submitter:
    """What `python -m bench submit` is asked to do: run for the tenants in parallel."""

    argv: list[str]  # the sendmail command, to which the sender and recipient are added
    env: dict[str, str]
    tag: str
    size: int
    tenants: list[dict[str, Any]]  # {"domain", "uid", "count"}
    domains: list[str]  # message seq goes to sink@domains[seq % len(domains)]


@dataclass
class Submissions:
    first: float = float("inf")  # monotonic time the first command started
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    submitted: dict[str, float] = field(default_factory=dict)  # name -> command's start, wall


def recipient(domains: list[str], seq: int) -> str:
    return f"sink@{domains[seq % len(domains)]}"


def submit_main(spec_path: str) -> int:
    """`python -m bench submit SPEC`: run the submissions, print the times as JSON."""
    spec = Submitter(**json.loads(Path(spec_path).read_text()))
    result = Submissions()
    lock = threading.Lock()

    def one_tenant(domain: str, uid: int, count: int) -> None:
        for seq in range(count):
            to = recipient(spec.domains, seq)
            body = message(spec.tag, domain, seq, spec.size, to)
            argv = [*spec.argv, "-i", "-f", sender(domain), to]
            started, submitted = time.monotonic(), time.time()
            done = subprocess.run(
                argv,
                input=body,
                user=uid,
                group=uid,
                extra_groups=[],
                env=spec.env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            took = time.monotonic() - started
            with lock:
                result.first = min(result.first, started)
                result.latencies.append(took)
                result.submitted[name_of(spec.tag, domain, seq)] = submitted
                if done.returncode != 0:
                    result.failures.append(
                        f"{domain} {seq}: exit {done.returncode}: {done.stderr!r}"
                    )

    threads = [
        threading.Thread(target=one_tenant, args=(t["domain"], t["uid"], t["count"]))
        for t in spec.tenants
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(asdict(result)))
    return 0


def run_submitter(
    spec: Submitter, wrap: Callable[[list[str]], list[str]], workdir: Path
) -> subprocess.Popen[bytes]:
    """Start `python -m bench submit` (wrapped, e.g. into a mount namespace)."""
    fd, path = tempfile.mkstemp(suffix=".json", dir=workdir)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(spec), f)
    argv = wrap([sys.executable, "-m", "bench", "submit", path])
    top = Path(__file__).resolve().parent.parent
    return subprocess.Popen(argv, cwd=top, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def submitted(proc: subprocess.Popen[bytes], timeout: float) -> Submissions:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"submitter failed ({proc.returncode}): {err.decode(errors='replace')}")
    return Submissions(**json.loads(out))
