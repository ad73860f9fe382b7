"""Delivery throughput, submission latency, CPU per message and adverse receivers: nsmail
against Postfix, in one run.

Both systems send the same messages for the same K tenants (t{i}.bench.test at
198.51.100.70+i and 2001:db8:51::70+i, forward and reverse DNS in the lab's NSD), each
with its default delivery settings (nsmail: `[delivery]` as shipped, RFC 5321 timeouts;
Postfix: main.cf defaults). The instant receiver is one `smtp-sink` per MX address of
`rcpt.test` (`bench.arrivals`); the adverse ones are the lab's (`lab.receivers`). Figures,
for each system:

(a) prefilled queues, instant sink: each tenant's queue holds its share of N messages
    while nothing delivers (nsmail: written to the maildrop with `Hosting.enqueue_many`
    before the supervisor starts; Postfix: its own `sendmail` run while its master is
    down, so the messages wait in its maildrop); the clock runs from starting the
    supervisor or the master to the receiver holding all N. Both clocks include start-up
    and pick-up (header completion, Postfix's cleanup). (g) and (i) are timed alike.
(b) end to end, instant sink: the daemon runs, one submitter per tenant runs that
    system's sendmail command as the tenant's uid, one message after the other; the clock
    runs from the first submission to the sink holding all N. With few tenants this is
    bounded by K / (c): it is how fast K scripts calling sendmail in a loop get their
    mail out.
(c) the wall time of each sendmail command of (b), p50 and p99.
(f) CPU seconds (user + system) per 1,000 messages of the delivering side: the
    supervisor's or the master's whole process tree (live processes and reaped ones, via
    /proc/PID/stat utime+stime+cutime+cstime), over (a) and over (b). The sendmail
    commands are the submitting side and are not counted.
(g) a slow receiver: the queues hold G messages (200) for slow.test, whose MX answers
    each final dot after a second (`SlowSmtp`); prefilled as (a), but the clock runs from
    the receiver's first connection, so that neither system's start-up counts. What
    counts is how many sessions a system keeps busy at once: both start a destination at
    5 and add one per delivery up to 20 (per tenant for nsmail; per transport, so per
    tenant, for Postfix).
(h) a tarpit ahead of healthy mail: with the daemon running, the first tenant submits 3
    messages to tarpit.test, whose MX accepts and never greets (`Tarpit`; both give a
    greeting five minutes), then 30 to rcpt.test. The figures are the delay from the
    last healthy message's submission (the start of its sendmail command) to its arrival
    at the sink, and the p99 of the 30 delays. The tarpit is stopped after, which ends the sessions
    it held (their mail is deferred).
(i) many destinations, instant sink: the queues hold N messages for D domains
    (d{k}.many.test, 200), each with an MX host of its own (mx.d{k}.many.test) at the
    sink's addresses: D destinations to route, open sessions to and share the sessions
    among.

Each system's round runs (a) then (b) with the daemon up, (i), then (g) then (h) with the
daemon up, stopping it in between. The two systems' rounds take turns (nsmail's, then
Postfix's, then nsmail's again), so that both meet the same drift in this machine's speed,
which moves the figures of either by a quarter within minutes. Every phase is checked
message by message (`bench.arrivals.check`), or the run fails.

Security: benchmark infrastructure, runs as root; everything it makes lives in the lab's
prefixed namespaces and temporary directory.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hosting import Hosting, TenantSpec, dns_records
from lab import MX_V4, MX_V6, Lab, Nsd, Record
from lab.receivers import SLOW, TARPIT, SlowSmtp, Tarpit

from bench.arrivals import Receiver, Sink, collect, message, name_of, sender, wait_for
from bench.postfix_baseline import SENDMAIL as POSTFIX_SENDMAIL
from bench.postfix_baseline import SendingPostfix
from bench.processes import tree_cpu
from bench.submit import Submitter, recipient, run_submitter, submitted
from nsmail.core.config import DeliveryConfig, SmtpTimeouts

NSMAIL_SENDMAIL = str(Path(sys.executable).with_name("nsmail-sendmail"))
RECIPIENT_DOMAIN = "rcpt.test"
MAX_TENANTS = 180  # 198.51.100.70 + i stays below .250
TARPIT_FIRST, HEALTHY = 3, 30  # (h): messages to the tarpit, then to the sink
PHASES = {
    "a": "prefilled queues, instant sink",
    "b": "end to end through its sendmail",
    "i": "prefilled queues for many domains, instant sink",
    "g": "prefilled queues, slow receiver (timed from its first connection)",
    "h": "healthy mail behind a tarpit, end to end",
}
# nsmail as shipped, not the tests' short timeouts (Hosting's default): the adverse cases
# are about what a default configuration does.
_DEFAULTS = DeliveryConfig()
NSMAIL_DELIVERY: dict[str, Any] = {
    "scan_interval": _DEFAULTS.scan_interval,
    "timeout": _DEFAULTS.timeout,
    **{
        f"smtp_{stage}_timeout": getattr(_DEFAULTS.smtp_timeouts, stage)
        for stage in SmtpTimeouts.__dataclass_fields__
    },
}


@dataclass(frozen=True, slots=True)
class Options:
    messages: int = 2000
    tenants: int = 2
    size: int = 2000
    repeat: int = 1
    slow_messages: int = 200  # (g)
    destinations: int = 200  # (i)
    timeout: float | None = None  # seconds to wait for all N, per phase; None: by N
    phases: str = "abigh"  # which to run ((b) runs on the daemon (a) started: it brings (a))

    @property
    def wait(self) -> float:
        # Generous: nsmail's sendmail runs about 20 a second on this 2-core machine.
        return self.timeout if self.timeout is not None else 60 + self.messages * 0.25


def bench_tenants(count: int) -> tuple[TenantSpec, ...]:
    return tuple(
        TenantSpec(f"t{i}.bench.test", f"198.51.100.{70 + i}", f"2001:db8:51::{0x70 + i:x}")
        for i in range(count)
    )


def shares(messages: int, tenants: int) -> tuple[int, ...]:
    """How many of `messages` each tenant sends: as even as it gets."""
    return tuple(messages // tenants + (i < messages % tenants) for i in range(tenants))


def many_domains(count: int) -> tuple[str, ...]:
    return tuple(f"d{k}.many.test" for k in range(count))


def many_records(domains: Sequence[str]) -> list[Record]:
    """An MX host of its own for each domain, all at the sink's addresses."""
    records: list[Record] = []
    for domain in domains:
        host = f"mx.{domain}"
        records += [(domain, "MX", f"10 {host}"), (host, "A", MX_V4), (host, "AAAA", MX_V6)]
    return records


@dataclass(frozen=True, slots=True)
class Mail:
    """One phase's messages: tenant i sends counts[i] of them, message seq of each to
    sink@domains[seq % len(domains)]."""

    tag: str
    counts: tuple[int, ...]
    domains: tuple[str, ...] = (RECIPIENT_DOMAIN,)

    def names(self, tenants: Sequence[TenantSpec], at: Collection[str] | None = None) -> set[str]:
        """The names of the messages (of those for a domain in `at`, if given)."""
        return {
            name_of(self.tag, t.domain, seq)
            for t, n in zip(tenants, self.counts, strict=True)
            for seq in range(n)
            if at is None or self.domains[seq % len(self.domains)] in at
        }


# -- one round per system ------------------------------------------------------------------


@dataclass
class Phase:
    """One timed delivery of a phase's messages: the figures and the check behind them."""

    seconds: float | None = None  # from the start to the receiver holding them all
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
    slow: Phase = field(default_factory=Phase)
    tarpit_last_ms: float | None = None  # (h): the last healthy message's delay
    tarpit_p99_ms: float | None = None
    tarpit_connections: int = 0  # sessions the tarpit was asked for
    many: Phase = field(default_factory=Phase)
    problems: list[str] = field(default_factory=list)


class Side(Protocol):
    """One system under test, as the rounds drive it."""

    name: str
    sendmail: list[str]
    env: dict[str, str]

    def wrap(self, argv: list[str]) -> list[str]: ...

    def fill(self, mail: Mail, problems: list[str]) -> None:
        """Queue `mail` while the daemon is down."""

    def start(self) -> Callable[[], int]:
        """Start the daemon; the pid of its process tree's root, once known."""

    def stop(self, problems: list[str]) -> None: ...


class NsmailSide:
    name = "nsmail"

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.hosting = bench.hosting
        self.sendmail = [NSMAIL_SENDMAIL]
        self.env = {"NSMAIL_CONFIG": str(self.hosting.config_path), "PATH": "/usr/bin:/bin"}

    def wrap(self, argv: list[str]) -> list[str]:
        return argv

    def fill(self, mail: Mail, problems: list[str]) -> None:
        size = self.bench.options.size
        for t, n in zip(self.bench.tenants, mail.counts, strict=True):
            by_recipient: dict[str, list[bytes]] = {}
            for seq in range(n):
                to = recipient(list(mail.domains), seq)
                by_recipient.setdefault(to, []).append(message(mail.tag, t.domain, seq, size, to))
            for to, bodies in by_recipient.items():
                self.hosting.enqueue_many(t.domain, sender(t.domain), [to], bodies)

    def start(self) -> Callable[[], int]:
        self.hosting.start(timeout=60)
        assert self.hosting.proc is not None
        pid = self.hosting.proc.pid
        return lambda: pid

    def stop(self, problems: list[str]) -> None:
        if self.hosting.stop(timeout=60) != 0:
            problems.append(f"the supervisor did not stop cleanly:\n{self.hosting.log()}")


class PostfixSide:
    name = "postfix"

    def __init__(self, bench: Bench, postfix: SendingPostfix) -> None:
        self.bench = bench
        self.postfix = postfix
        self.sendmail = [POSTFIX_SENDMAIL]
        self.env = {"PATH": "/usr/bin:/bin"}

    def wrap(self, argv: list[str]) -> list[str]:
        return self.postfix.wrap(argv)

    def fill(self, mail: Mail, problems: list[str]) -> None:
        before = self.postfix.queued()  # what (h) left deferred, in rounds before
        subs = submitted(self.bench.submit(self, mail), self.bench.options.wait)
        problems += subs.failures[:5]
        if (queued := self.postfix.queued() - before) != sum(mail.counts):
            problems.append(f"{mail.tag}: {queued} queued, not {sum(mail.counts)}")

    def start(self) -> Callable[[], int]:
        starter = self.postfix.start()
        master: list[int] = []

        def root() -> int:
            if not master:
                master.append(self.postfix.started(starter))
            return master[0]

        return root

    def stop(self, problems: list[str]) -> None:
        self.postfix.stop()


class Bench:
    """The lab, the DNS, the receivers and the tenants both systems share."""

    def __init__(self, lab: Lab, options: Options, log: Callable[[str], None]) -> None:
        self.lab = lab
        self.options = options
        self.log = log
        self.tenants = bench_tenants(options.tenants)
        self.counts = shares(options.messages, options.tenants)
        self.many = many_domains(options.destinations)
        records = dns_records(self.tenants) + SLOW.records() + TARPIT.records()
        Nsd(lab, records + many_records(self.many))
        self.sink = Sink(lab)
        self.slow = SlowSmtp(lab)
        self.hosting = Hosting(lab)
        self.hosting.write_config(self.tenants, **NSMAIL_DELIVERY)
        self.work = lab.tempdir("bench")

    def submit(self, side: Side, mail: Mail) -> Any:
        """Start `python -m bench submit` for `mail` with `side`'s sendmail."""
        tenants = [
            {"domain": t.domain, "uid": self.hosting.uid(t.domain), "count": n}
            for t, n in zip(self.tenants, mail.counts, strict=True)
        ]
        spec = Submitter(
            side.sendmail, side.env, mail.tag, self.options.size, tenants, list(mail.domains)
        )
        return run_submitter(spec, side.wrap, self.work)

    def round(self, side: Side, r: int) -> Round:
        round_ = Round()
        problems = round_.problems

        def mail(phase: str, counts: tuple[int, ...], domains: tuple[str, ...]) -> Mail:
            self.log(f"{side.name} round {r}: ({phase}) {PHASES[phase]}")
            return Mail(f"{side.name}-r{r}-{phase}", counts, domains)

        instant = (RECIPIENT_DOMAIN,)
        phases = self.options.phases
        if "a" in phases or "b" in phases:
            round_.prefilled, root = self.prefilled(
                side, mail("a", self.counts, instant), self.sink, problems
            )
            if "b" in phases:
                self.end_to_end(side, root(), mail("b", self.counts, instant), round_)
            side.stop(problems)
        if "i" in phases:
            round_.many, _ = self.prefilled(
                side, mail("i", self.counts, self.many), self.sink, problems
            )
            side.stop(problems)
        if "g" in phases:
            slow = shares(self.options.slow_messages, len(self.tenants))
            round_.slow = self.slow_receiver(side, mail("g", slow, (SLOW.domain,)), problems)
        if "h" in phases:
            first_only = (TARPIT_FIRST + HEALTHY,) + (0,) * (len(self.tenants) - 1)
            domains = (TARPIT.domain,) * TARPIT_FIRST + instant * HEALTHY
            if "g" not in phases:
                side.start()
            self.tarpit(side, mail("h", first_only, domains), round_)
        if "g" in phases or "h" in phases:
            side.stop(problems)
        return round_

    def prefilled(
        self, side: Side, mail: Mail, receiver: Receiver, problems: list[str]
    ) -> tuple[Phase, Callable[[], int]]:
        """Queue `mail` with the daemon down, start it, time the delivery; the daemon runs
        on after."""
        side.fill(mail, problems)
        start = time.monotonic()
        root = side.start()
        return self.deliver(mail, receiver, lambda: tree_cpu(root()), problems)(start), root

    def slow_receiver(self, side: Side, mail: Mail, problems: list[str]) -> Phase:
        """(g): as `prefilled`, but timed from the receiver's first connection: what a
        system does once it talks to the slow receiver, its start-up left to (a)."""
        side.fill(mail, problems)
        start, wall = time.monotonic(), time.time()
        root = side.start()
        phase = self.deliver(mail, self.slow, lambda: tree_cpu(root()), problems)
        first = min((t for t in self.slow.connections() if t >= wall), default=wall)
        return phase(start + first - wall)

    def deliver(
        self, mail: Mail, receiver: Receiver, cpu: Callable[[], float], problems: list[str]
    ) -> Callable[[float], Phase]:
        """Wait for all of `mail` at `receiver`, then check it; the phase once its start
        is known. `cpu` is the delivering side's CPU seconds so far (called when the last
        message is in)."""
        expected = mail.names(self.tenants)
        n = len(expected)
        sink_before = self.sink.cpu()
        first, last = wait_for(receiver, n, self.options.wait)
        used = cpu() if last is not None else None
        sink_used = self.sink.cpu() - sink_before
        result, _ = collect(receiver, expected, self.tenants)
        if last is None:
            problems.append(f"{mail.tag}: only {result.received} of {n} arrived in time")
        if not result.ok:
            problems.append(f"{mail.tag}: check failed: {result}")

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

    def end_to_end(self, side: Side, root: int, mail: Mail, round_: Round) -> None:
        """(b) and (c): the daemon under `root` runs; submit `mail` through its sendmail."""
        before = tree_cpu(root)
        proc = self.submit(side, mail)
        phase = self.deliver(mail, self.sink, lambda: tree_cpu(root) - before, round_.problems)
        subs = submitted(proc, self.options.wait)
        round_.problems += subs.failures[:5]
        round_.end_to_end = phase(subs.first)
        if subs.latencies:
            round_.latency_p50_ms = percentile(subs.latencies, 50) * 1000
            round_.latency_p99_ms = percentile(subs.latencies, 99) * 1000

    def tarpit(self, side: Side, mail: Mail, round_: Round) -> None:
        """(h): the daemon runs; `mail` goes to the tarpit first, then to the sink."""
        problems = round_.problems
        expected = mail.names(self.tenants, at={RECIPIENT_DOMAIN})
        tarpit = Tarpit(self.lab)  # a fresh one: stopping it ends the sessions it holds
        try:
            subs = submitted(self.submit(side, mail), self.options.wait)
            _, last = wait_for(self.sink, len(expected), self.options.wait)
            result, arrivals = collect(self.sink, expected, self.tenants)
            round_.tarpit_connections = len(tarpit.connections())
        finally:
            tarpit.stop()
        problems += subs.failures[:5]
        if last is None:
            problems.append(f"{mail.tag}: only {result.received} of {len(expected)} in time")
        if not result.ok:
            problems.append(f"{mail.tag}: check failed: {result}")
        if not round_.tarpit_connections:
            problems.append(f"{mail.tag}: the tarpit was never connected to")
        delays = {
            a.name: a.at - subs.submitted[a.name] for a in arrivals if a.name in subs.submitted
        }
        healthy = [delays[name] for name in expected if name in delays]
        last_name = name_of(mail.tag, self.tenants[0].domain, TARPIT_FIRST + HEALTHY - 1)
        if last_name in delays:
            round_.tarpit_last_ms = delays[last_name] * 1000
        if healthy:
            round_.tarpit_p99_ms = percentile(healthy, 99) * 1000


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
    ("(a) prefilled queues, instant sink", "msg/s", lambda r: r.prefilled.rate, True),
    ("(b) end to end via sendmail", "msg/s", lambda r: r.end_to_end.rate, True),
    ("(c) sendmail latency p50", "ms", lambda r: r.latency_p50_ms, False),
    ("(c) sendmail latency p99", "ms", lambda r: r.latency_p99_ms, False),
    ("(f) CPU per 1000 msgs in (a)", "s", lambda r: r.prefilled.cpu_per_1000, False),
    ("(f) CPU per 1000 msgs in (b)", "s", lambda r: r.end_to_end.cpu_per_1000, False),
    ("(g) slow receiver, 1 s after the dot", "msg/s", lambda r: r.slow.rate, True),
    ("(h) tarpit MX first: last healthy msg", "ms", lambda r: r.tarpit_last_ms, False),
    ("(h) tarpit MX first: healthy p99", "ms", lambda r: r.tarpit_p99_ms, False),
    ("(i) many destinations, instant sink", "msg/s", lambda r: r.many.rate, True),
)


def measure_throughput(options: Options, log: Callable[[str], None]) -> dict[str, Any]:
    """Run both systems `options.repeat` times; the median figures, every round and check."""
    if not 1 <= options.tenants <= MAX_TENANTS:
        raise ValueError(f"--tenants must be 1..{MAX_TENANTS}")
    if min(options.messages, options.slow_messages) < options.tenants or options.repeat < 1:
        raise ValueError("--messages must be at least --tenants, --repeat at least 1")
    if options.destinations < 1:
        raise ValueError("--destinations must be at least 1")
    if not options.phases or set(options.phases) - set(PHASES):
        raise ValueError(f"--phases is some of {''.join(PHASES)}")
    with Lab() as lab:
        bench = Bench(lab, options, log)
        ours, theirs = NsmailSide(bench), PostfixSide(bench, SendingPostfix(lab, bench.tenants))
        nsmail: list[Round] = []
        baseline: list[Round] = []
        # The rounds take turns: this machine's speed drifts over minutes, and both systems
        # must meet the same drift. Each holds the tenants' addresses only while it runs.
        for r in range(options.repeat):
            nsmail.append(bench.round(ours, r))
            baseline.append(bench.round(theirs, r))
    report = compare(FIGURES, nsmail, baseline)
    report["rounds"] = {
        "nsmail": [asdict(r) for r in nsmail],
        "postfix": [asdict(r) for r in baseline],
    }
    return {"options": asdict(options), **report}


def compare(
    figures: Sequence[tuple[str, str, Callable[[Any], float | None], bool]],
    nsmail: Sequence[Any],
    postfix: Sequence[Any],
) -> dict[str, Any]:
    """The medians of each figure over the rounds of both sides, their ratio (>1: nsmail
    better), and every problem a round met: `rows`, `ok`, `problems` of a report."""
    rows = []
    for label, unit, read, higher_better in figures:
        ours = median([read(r) for r in nsmail])
        theirs = median([read(r) for r in postfix])
        ratio = None
        if ours and theirs:
            ratio = ours / theirs if higher_better else theirs / ours
        rows.append(
            {"figure": label, "unit": unit, "nsmail": ours, "postfix": theirs, "ratio": ratio}
        )
    problems = [f"nsmail: {p}" for r in nsmail for p in r.problems]
    problems += [f"postfix: {p}" for r in postfix for p in r.problems]
    return {"rows": rows, "ok": not problems, "problems": problems}


def table(report: dict[str, Any]) -> str:
    o = report["options"]
    lines = [
        f"{o['messages']} messages of {o['size']} bytes from {o['tenants']} tenants "
        f"((g): {o['slow_messages']}, (h): {TARPIT_FIRST} + {HEALTHY}, (i): to "
        f"{o['destinations']} domains), median of {o['repeat']} round(s); every message "
        "checked: "
        + ("all arrived once, from the right address and EHLO" if report["ok"] else "FAILED"),
        f"{'figure':<46} {'nsmail':>9} {'postfix':>9}  ratio (>1: nsmail better)",
    ]
    for row in report["rows"]:
        label = f"{row['figure']} ({row['unit']})"
        ratio = _cell(row["ratio"], "x")
        lines.append(f"{label:<46} {_cell(row['nsmail']):>9} {_cell(row['postfix']):>9}  {ratio}")
    lines.append("ratio: nsmail/postfix for rates, postfix/nsmail for times and CPU")
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    return "\n".join(lines)


def _cell(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
