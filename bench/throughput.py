"""Delivery throughput, submission latency and CPU per message: nsmail against Postfix.

Both systems send the same messages for the same K tenants (t{i}.bench.test at
198.51.100.70+i and 2001:db8:51::70+i, forward and reverse DNS in the lab's NSD,
`rcpt.test` MX `mx.test`) into one `smtp-sink` in the lab's "net" namespace, listening
on [::]:25 (so on both MX_V4 and MX_V6). Figures, for each system:

(a) prefilled queues: each tenant's queue holds its share of N messages while nothing
    delivers (nsmail: written to the maildrop with `Hosting.enqueue` before the
    supervisor starts; Postfix: its own `sendmail` run while its master is down, so the
    messages wait in its maildrop); the clock runs from starting the supervisor or the
    master to the sink holding all N. Both clocks include start-up and pick-up (header
    completion, Postfix's cleanup).
(b) end to end: the daemon runs, one submitter per tenant runs that system's sendmail
    command as the tenant's uid, one message after the other; the clock runs from the
    first submission to the sink holding all N. With few tenants this is bounded by
    K / (c): it is how fast K scripts calling sendmail in a loop get their mail out.
(c) the wall time of each sendmail command of (b), p50 and p99.
(f) CPU seconds (user + system) per 1,000 messages of the delivering side: the
    supervisor's or the master's whole process tree (live processes and reaped ones, via
    /proc/PID/stat utime+stime+cutime+cstime), over (a) and over (b). The sendmail
    commands are the submitting side and are not counted.

The sink is Postfix's `smtp-sink` (the speed ceiling: one event-driven C process) with
`-d`, which dumps every transaction to a file of its own headed by `X-Client-Addr`,
`X-Helo-Args` and `X-Mail-Args`. Every run is checked message by message: each of the N
must arrive exactly once, from one of its tenant's addresses, with EHLO the tenant's name
and MAIL FROM the tenant's sender, or the run fails, so a fast wrong answer cannot win.
The check reads the dumps after the clock stops; a dump is complete when it holds the
message's last line. The submitting commands run in a separate process (`python -m bench
submit`) so that, for Postfix, it can live in the baseline's private mount namespace.

Security: benchmark infrastructure, runs as root; everything it makes lives in the lab's
prefixed namespaces and temporary directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hosting import Hosting, TenantSpec, dns_records
from lab import Lab, LabError, Nsd

from bench.postfix_baseline import SENDMAIL as POSTFIX_SENDMAIL
from bench.postfix_baseline import SendingPostfix
from bench.processes import tree_cpu

NSMAIL_SENDMAIL = str(Path(sys.executable).with_name("nsmail-sendmail"))
RECIPIENT = "sink@rcpt.test"
MAX_TENANTS = 180  # 198.51.100.70 + i stays below .250
_POLL = 0.005


@dataclass(frozen=True, slots=True)
class Options:
    messages: int = 2000
    tenants: int = 2
    size: int = 2000
    repeat: int = 1
    timeout: float | None = None  # seconds to wait for all N, per phase; None: by N

    @property
    def wait(self) -> float:
        # Generous: nsmail's sendmail runs about 20 a second on this 2-core machine.
        return self.timeout if self.timeout is not None else 60 + self.messages * 0.25


def bench_tenants(count: int) -> tuple[TenantSpec, ...]:
    return tuple(
        TenantSpec(f"t{i}.bench.test", f"198.51.100.{70 + i}", f"2001:db8:51::{0x70 + i:x}")
        for i in range(count)
    )


def shares(messages: int, tenants: int) -> list[int]:
    """How many of `messages` each tenant sends: as even as it gets."""
    return [messages // tenants + (i < messages % tenants) for i in range(tenants)]


def sender(domain: str) -> str:
    return f"alice@{domain}"


def message(tag: str, domain: str, seq: int, size: int) -> bytes:
    """Message `seq` of `domain` in run `tag`, about `size` bytes; its last line names it."""
    name = f"{tag} {domain} {seq}"
    head = f"From: {sender(domain)}\nTo: {RECIPIENT}\nSubject: bench {name}\n\n"
    last = f"end {name}\n"
    filler = max(0, size - len(head) - len(last))
    lines, rest = divmod(filler, 76)
    body = ("x" * 75 + "\n") * lines + ("y" * (rest - 1) + "\n" if rest else "")
    return (head + body + last).encode()


# -- the sink ------------------------------------------------------------------------------


class Sink:
    """`smtp-sink` on [::]:25 in `lab.net`, dumping each transaction to a file."""

    def __init__(self, lab: Lab) -> None:
        self.dir = lab.tempdir("sink")
        self.dumps = self.dir / "dumps"
        self.dumps.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(self.dumps, nobody.pw_uid, nobody.pw_gid)
        self._out = (self.dir / "smtp-sink.log").open("wb")
        lab.defer(self._out.close)
        argv = ["smtp-sink", "-u", "nobody", "-h", "mx.test", "-d", f"{self.dumps}/%s."]
        self.proc = lab.popen(
            lab.net, [*argv, "[::]:25", "1024"], stdout=self._out, stderr=self._out
        )
        deadline = time.monotonic() + 10
        while ":25 " not in lab.run(lab.net, ["ss", "-Hltn"]).stdout:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"smtp-sink did not start: {self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return (self.dir / "smtp-sink.log").read_text(errors="replace")

    def count(self) -> int:
        return len(os.listdir(self.dumps))

    def wait_for(self, count: int, timeout: float) -> tuple[float | None, float | None]:
        """Monotonic times at which the first dump and `count` dumps were there (None: not
        within `timeout`)."""
        deadline = time.monotonic() + timeout
        first = None
        while True:
            now = time.monotonic()
            seen = self.count()
            if first is None and seen:
                first = now
            if seen >= count:
                return first, now
            if now > deadline:
                return first, None
            time.sleep(_POLL)

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def dumped(self) -> list[Path]:
        return sorted(self.dumps.iterdir())


# -- checking what arrived -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One dumped transaction: who connected, what it said, and which message it carried."""

    client: str
    helo: str
    mail: str
    name: str  # "<tag> <domain> <seq>" from the Subject, "" if there was none
    complete: bool  # the message's last line ("end <name>") is there


def parse_dump(dump: bytes) -> Arrival:
    fields: dict[str, str] = {}
    name = ""
    lines = dump.decode(errors="replace").splitlines()
    for line in lines:
        key, colon, value = line.partition(":")
        if colon and key in ("X-Client-Addr", "X-Helo-Args", "X-Mail-Args"):
            fields.setdefault(key, value.strip())
        elif key == "Subject" and value.startswith(" bench "):
            name = value.removeprefix(" bench ").strip()
            break
    complete = bool(name) and f"end {name}" in lines
    client = fields.get("X-Client-Addr", "").removeprefix("ipv6:")
    mail = fields.get("X-Mail-Args", "").split(" ", 1)[0].removeprefix("FROM:")
    return Arrival(client, fields.get("X-Helo-Args", ""), mail, name, complete)


@dataclass(frozen=True, slots=True)
class Check:
    """What a run delivered against what it should have."""

    received: int
    missing: int
    duplicates: int
    wrong: tuple[str, ...]  # the first few wrong arrivals, explained
    wrong_count: int
    families: dict[str, int]  # arrivals by the client address family

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicates or self.wrong_count)


def check(
    arrivals: Sequence[Arrival], tag: str, tenants: Sequence[TenantSpec], counts: Sequence[int]
) -> Check:
    expected = {
        f"{tag} {t.domain} {seq}" for t, n in zip(tenants, counts, strict=True) for seq in range(n)
    }
    by_domain = {t.domain: t for t in tenants}
    seen = Counter(a.name for a in arrivals)
    wrong = [w for a in arrivals if (w := _wrong(a, by_domain, expected))]
    families = Counter(
        f"ipv{ipaddress.ip_address(a.client).version}" for a in arrivals if _is_address(a.client)
    )
    return Check(
        received=len(arrivals),
        missing=len(expected - seen.keys()),
        duplicates=sum(n - 1 for name, n in seen.items() if n > 1 and name in expected),
        wrong=tuple(wrong[:5]),
        wrong_count=len(wrong),
        families=dict(families),
    )


def _wrong(a: Arrival, tenants: dict[str, TenantSpec], expected: set[str]) -> str:
    if a.name not in expected:
        return f"unexpected message {a.name!r} from {a.client}"
    domain = a.name.split()[1]
    t = tenants[domain]
    own = {str(ipaddress.ip_address(x)) for x in (t.ipv4, t.ipv6) if x}
    client = str(ipaddress.ip_address(a.client)) if _is_address(a.client) else a.client
    if client not in own:
        return f"{a.name}: from {a.client}, not {domain}'s address"
    if a.helo != domain:
        return f"{a.name}: EHLO {a.helo!r}, not {domain}"
    if a.mail.lower() != f"<{sender(domain)}>":
        return f"{a.name}: MAIL FROM {a.mail}, not <{sender(domain)}>"
    if not a.complete:
        return f"{a.name}: truncated"
    return ""


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def collect(sink: Sink, tag: str, tenants: Sequence[TenantSpec], counts: Sequence[int]) -> Check:
    """Check, then clear, what the sink holds, once transactions in flight are written."""
    deadline = time.monotonic() + 5
    while True:
        paths = sink.dumped()
        result = check([parse_dump(p.read_bytes()) for p in paths], tag, tenants, counts)
        if result.ok or time.monotonic() > deadline:
            for path in paths:
                path.unlink()
            return result
        time.sleep(0.1)


# -- process trees and their CPU time ------------------------------------------------------


# -- submitting through sendmail -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submitter:
    """What `python -m bench submit` is asked to do: run for the tenants in parallel."""

    argv: list[str]  # the sendmail command, to which the sender and recipient are added
    env: dict[str, str]
    tag: str
    size: int
    tenants: list[dict[str, Any]]  # {"domain", "uid", "count"}


@dataclass
class Submissions:
    first: float = float("inf")  # monotonic time the first command started
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def submit_main(spec_path: str) -> int:
    """`python -m bench submit SPEC`: run the submissions, print the times as JSON."""
    spec = Submitter(**json.loads(Path(spec_path).read_text()))
    result = Submissions()
    lock = threading.Lock()

    def one_tenant(domain: str, uid: int, count: int) -> None:
        for seq in range(count):
            body = message(spec.tag, domain, seq, spec.size)
            argv = [*spec.argv, "-i", "-f", sender(domain), RECIPIENT]
            started = time.monotonic()
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


# -- one round per system ------------------------------------------------------------------


@dataclass
class Phase:
    """One timed delivery of N messages: the figures and the check behind them."""

    seconds: float | None = None  # from the start to the sink holding all N
    first_seconds: float | None = None  # from the start to the first arrival
    rate: float | None = None  # messages per second
    cpu_per_1000: float | None = None  # CPU seconds of the delivering side
    sink_cpu_per_1000: float | None = None  # CPU seconds of smtp-sink, for scale
    check: dict[str, Any] = field(default_factory=dict)


@dataclass
class Round:
    """The figures of one round of one system."""

    prefilled: Phase = field(default_factory=Phase)
    end_to_end: Phase = field(default_factory=Phase)
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    problems: list[str] = field(default_factory=list)


class Bench:
    """The lab, the DNS, the sink and the tenants both systems share."""

    def __init__(self, lab: Lab, options: Options, log: Callable[[str], None]) -> None:
        self.lab = lab
        self.options = options
        self.log = log
        self.tenants = bench_tenants(options.tenants)
        self.counts = shares(options.messages, options.tenants)
        Nsd(lab, dns_records(self.tenants))
        self.sink = Sink(lab)
        self.hosting = Hosting(lab)
        self.hosting.write_config(self.tenants)
        self.work = lab.tempdir("bench")

    def submitter(self, argv: list[str], env: dict[str, str], tag: str) -> Submitter:
        tenants = [
            {"domain": t.domain, "uid": self.hosting.uid(t.domain), "count": n}
            for t, n in zip(self.tenants, self.counts, strict=True)
        ]
        return Submitter(argv, env, tag, self.options.size, tenants)

    def deliver(
        self, tag: str, cpu: Callable[[], float], problems: list[str]
    ) -> Callable[[float], Phase]:
        """Wait for all N at the sink, then check them; the phase once its start is known.

        `cpu` is the delivering side's CPU seconds so far (called when the last message
        is in); the returned function takes the phase's start (monotonic).
        """
        n = self.options.messages
        sink_before = self.sink.cpu()
        first, last = self.sink.wait_for(n, self.options.wait)
        used = cpu() if last is not None else None
        sink_used = self.sink.cpu() - sink_before
        result = collect(self.sink, tag, self.tenants, self.counts)
        if last is None:
            problems.append(f"{tag}: only {result.received} of {n} arrived in time")
        if not result.ok:
            problems.append(f"{tag}: check failed: {result}")

        def phase(start: float) -> Phase:
            return Phase(
                seconds=None if last is None else last - start,
                first_seconds=None if first is None else first - start,
                rate=None if last is None else n / (last - start),
                cpu_per_1000=None if used is None else used / n * 1000,
                sink_cpu_per_1000=sink_used / n * 1000,
                check=asdict(result),
            )

        return phase

    def end_to_end(
        self, spec: Submitter, wrap: Callable[[list[str]], list[str]], root: int, round_: Round
    ) -> None:
        """(b) and (c): the daemon under `root` runs; submit all N through `spec`."""
        before = tree_cpu(root)
        proc = run_submitter(spec, wrap, self.work)
        phase = self.deliver(spec.tag, lambda: tree_cpu(root) - before, round_.problems)
        subs = submitted(proc, self.options.wait)
        round_.problems += subs.failures[:5]
        round_.end_to_end = phase(subs.first)
        if subs.latencies:
            round_.latency_p50_ms = percentile(subs.latencies, 50) * 1000
            round_.latency_p99_ms = percentile(subs.latencies, 99) * 1000

    def nsmail_round(self, r: int) -> Round:
        round_ = Round()
        hosting = self.hosting
        tag = f"nsmail-r{r}-a"
        self.log(f"nsmail round {r}: filling the maildrops")
        for t, n in zip(self.tenants, self.counts, strict=True):
            for seq in range(n):
                body = message(tag, t.domain, seq, self.options.size)
                hosting.enqueue(t.domain, sender(t.domain), [RECIPIENT], body)
        self.log(f"nsmail round {r}: (a) delivering the prefilled queues")
        start = time.monotonic()
        hosting.start(timeout=60)
        assert hosting.proc is not None
        pid = hosting.proc.pid
        round_.prefilled = self.deliver(tag, lambda: tree_cpu(pid), round_.problems)(start)
        self.log(f"nsmail round {r}: (b) end to end through nsmail-sendmail")
        env = {"NSMAIL_CONFIG": str(hosting.config_path), "PATH": "/usr/bin:/bin"}
        spec = self.submitter([NSMAIL_SENDMAIL], env, f"nsmail-r{r}-b")
        self.end_to_end(spec, lambda argv: argv, pid, round_)
        if hosting.stop(timeout=60) != 0:
            round_.problems.append(f"the supervisor did not stop cleanly:\n{hosting.log()}")
        return round_

    def postfix_round(self, postfix: SendingPostfix, r: int) -> Round:
        round_ = Round()
        tag = f"postfix-r{r}-a"
        self.log(f"postfix round {r}: filling its maildrop (master down)")
        spec = self.submitter([POSTFIX_SENDMAIL], {"PATH": "/usr/bin:/bin"}, tag)
        subs = submitted(run_submitter(spec, postfix.wrap, self.work), self.options.wait)
        round_.problems += subs.failures[:5]
        if (queued := postfix.queued()) != self.options.messages:
            round_.problems.append(f"{tag}: {queued} queued, not {self.options.messages}")
        self.log(f"postfix round {r}: (a) delivering the prefilled queue")
        start = time.monotonic()
        starter = postfix.start()
        master: list[int] = []

        def cpu() -> float:
            master.append(postfix.started(starter))
            return tree_cpu(master[0])

        round_.prefilled = self.deliver(tag, cpu, round_.problems)(start)
        root = master[0] if master else postfix.started(starter)
        self.log(f"postfix round {r}: (b) end to end through Postfix's sendmail")
        spec = self.submitter([POSTFIX_SENDMAIL], {"PATH": "/usr/bin:/bin"}, f"postfix-r{r}-b")
        self.end_to_end(spec, postfix.wrap, root, round_)
        postfix.stop()
        return round_


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


Figure = Callable[[Round], float | None]
FIGURES: tuple[tuple[str, str, Figure, bool], ...] = (
    # label, unit, how to read it from a round, whether higher is better
    ("(a) prefilled queues", "msg/s", lambda r: r.prefilled.rate, True),
    ("(b) end to end via sendmail", "msg/s", lambda r: r.end_to_end.rate, True),
    ("(c) sendmail latency p50", "ms", lambda r: r.latency_p50_ms, False),
    ("(c) sendmail latency p99", "ms", lambda r: r.latency_p99_ms, False),
    ("(f) CPU per 1000 msgs in (a)", "s", lambda r: r.prefilled.cpu_per_1000, False),
    ("(f) CPU per 1000 msgs in (b)", "s", lambda r: r.end_to_end.cpu_per_1000, False),
)


def measure_throughput(options: Options, log: Callable[[str], None]) -> dict[str, Any]:
    """Run both systems `options.repeat` times; the median figures, every round and check."""
    if not 1 <= options.tenants <= MAX_TENANTS:
        raise ValueError(f"--tenants must be 1..{MAX_TENANTS}")
    if options.messages < options.tenants or options.repeat < 1:
        raise ValueError("--messages must be at least --tenants, --repeat at least 1")
    with Lab() as lab:
        bench = Bench(lab, options, log)
        nsmail = [bench.nsmail_round(r) for r in range(options.repeat)]
        # The same addresses on the same bridge: Postfix's namespace may exist only once
        # nsmail's tenant namespaces are gone.
        postfix = SendingPostfix(lab, bench.tenants)
        baseline = [bench.postfix_round(postfix, r) for r in range(options.repeat)]
    rows = []
    for label, unit, read, higher_better in FIGURES:
        ours = median([read(r) for r in nsmail])
        theirs = median([read(r) for r in baseline])
        ratio = None
        if ours and theirs:
            ratio = ours / theirs if higher_better else theirs / ours
        rows.append(
            {"figure": label, "unit": unit, "nsmail": ours, "postfix": theirs, "ratio": ratio}
        )
    problems = [f"nsmail: {p}" for r in nsmail for p in r.problems]
    problems += [f"postfix: {p}" for r in baseline for p in r.problems]
    return {
        "options": asdict(options),
        "rows": rows,
        "ok": not problems,
        "problems": problems,
        "rounds": {"nsmail": [asdict(r) for r in nsmail], "postfix": [asdict(r) for r in baseline]},
    }


def table(report: dict[str, Any]) -> str:
    o = report["options"]
    lines = [
        f"{o['messages']} messages of {o['size']} bytes from {o['tenants']} tenants, "
        f"median of {o['repeat']} round(s); every message checked: "
        + ("all arrived once, from the right address and EHLO" if report["ok"] else "FAILED"),
        f"{'figure':<38} {'nsmail':>9} {'postfix':>9}  ratio (>1: nsmail better)",
    ]
    for row in report["rows"]:
        label = f"{row['figure']} ({row['unit']})"
        ratio = _cell(row["ratio"], "x")
        lines.append(f"{label:<38} {_cell(row['nsmail']):>9} {_cell(row['postfix']):>9}  {ratio}")
    lines.append("ratio: nsmail/postfix for rates, postfix/nsmail for latency and CPU")
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    return "\n".join(lines)


def _cell(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
