"""The soak test: thousands of messages through the real sendmail into a rude receiver while
workers and the supervisor itself are killed with SIGKILL; nothing may be lost or stuck.

    scripts/soak [--tenants K] [--messages N] [--worker-kills W] [--supervisor-kills S]
                 [--restarts R] [--submitters P] [--lifetime SECONDS] [--seed SEED] [--json]

K tenants (`s{i}.soak.test`) each have a local user, alice, who sends N/K messages, each
with a unique Message-ID and one or two recipients at rcpt.test, through the real
`nsmail-sendmail` run as the tenant's uid by a pool of P parallel submitters; a submission
counts once sendmail exited 0 (anything else is listed, and should not happen). The
receiver is `rude_smtp` with every misbehaviour it knows, slow answers among them; one
message in TARPIT_EVERY has one more recipient, at tarpit.test, whose MX (the same
process) accepts and never greets: those recipients wait, without holding up the rest,
until the queue lifetime (--lifetime) is over and they bounce. While mail is submitted, at
points of a plan drawn from the seed (a number of messages submitted), the engine
SIGKILLs a tenant's worker (its pid from `nsmail status`), SIGKILLs the supervisor and
starts it again RESTART_SEC later with the same configuration, as systemd's
Restart=on-failure does (its workers die with it: parent-death signal; the new one
clears what they left), or restarts it gracefully (SIGTERM, then start: an upgrade).

Accounting is per (Message-ID, recipient) pair, as in test_rude_e2e: delivered if the
receiver's log holds it acknowledged, bounced if a failure DSN in alice's Maildir names
it; duplicates are the receiver's extra records of a pair (a kill between the receiver's
250 and the queue update repeats a delivery: counted, not refused). Once everything is
submitted the engine waits, bounded, until every pair is delivered or bounced, every
spool is empty and every worker is up and idle. A pair neither delivered nor bounced is
lost if no queue holds it any more, unsettled if one still does; lost, unsettled,
quarantined (corrupt/) mail, a stuck or missing worker and a Traceback in the
supervisor's log are problems, and any problem makes the exit status 1.

The seed (printed; --seed or NSMAIL_SOAK_SEED replays it) draws the plan of faults and
the receiver's misbehaviour; the timing still varies with the machine's load.

Security: test infrastructure; runs as root; everything it makes lives in a lab's
prefixed namespaces and temporary directory, with documentation addresses only.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from hosting import Hosting, TenantSpec, dns_records
from lab import Lab, Nsd
from lab.receivers import TARPIT
from rude_smtp import RudeSmtp

from nsmail.core.queuefile import QueueFileError, decode
from nsmail.tenant.spool import CORRUPT, SPOOL_IN_HOME, STATES

SENDMAIL = str(Path(sys.executable).with_name("nsmail-sendmail"))
RESTART_SEC = 2.0  # systemd/nsmail.service: Restart=on-failure, RestartSec=2
STALL = 3.0  # the receiver's silences: longer than the client's timeout
DELIVERY: dict[str, Any] = {"scan_interval": 0.5, "timeout": 2, "retry_first": 1, "retry_max": 3}
TARPIT_EVERY = 20  # one message in so many has a recipient at the tarpit too
# States of a worker process that is up: "running" until its first report, then its own.
LIVE = ("running", "idle", "delivering", "backing off")
PROGRESS_EVERY = 10.0
FAULTS_WAIT = 75.0  # for a fault still due once all is submitted (a worker backing off)
IDLE_WAIT = 60.0  # after settling, for every worker to be up (a back-off is at most 60 s)

Pair = tuple[str, str]  # (Message-ID, recipient)


@dataclass(frozen=True, slots=True)
class Options:
    tenants: int = 10
    messages: int = 10_000
    worker_kills: int = 20
    supervisor_kills: int = 4
    restarts: int = 2  # graceful: SIGTERM, then start again
    submitters: int = 8
    seed: int = 0
    settle: float = 900.0  # seconds, after the last submission, for everything to settle
    lifetime: float = 60.0  # seconds in the queue before mail bounces (the tarpit's does)


@dataclass(frozen=True, slots=True)
class Fault:
    at: int  # when this many submissions have finished
    kind: str  # "worker", "supervisor" or "restart"
    tenant: int  # whose worker, for "worker"


@dataclass
class Figures:
    """What the run did and found; `problems` empty means it passed."""

    seed: int
    tenants: int
    messages: int = 0  # accepted by sendmail (exit 0)
    pairs: int = 0
    tarpit_pairs: int = 0  # pairs for the tarpit: bounced once the lifetime is over
    delivered: int = 0
    bounced: int = 0
    delivered_and_bounced: int = 0
    duplicates: int = 0  # extra records of a pair at the receiver
    acknowledged_twice: int = 0
    bounced_twice: int = 0
    lost: int = 0
    unsettled: int = 0  # neither delivered nor bounced, still queued at the end
    worker_kills: int = 0
    supervisor_kills: int = 0
    restarts: int = 0
    sendmail_failures: int = 0
    corrupt: int = 0
    wall_seconds: float = 0.0
    bounce_statuses: dict[str, int] = field(default_factory=dict)
    behaviours: dict[str, int] = field(default_factory=dict)  # stored records, by fate
    problems: list[str] = field(default_factory=list)


def soak_tenants(count: int) -> tuple[TenantSpec, ...]:
    return tuple(
        TenantSpec(f"s{i}.soak.test", f"198.51.100.{100 + i}", f"2001:db8:51::{0x100 + i:x}")
        for i in range(count)
    )


def plan(options: Options, rng: random.Random) -> list[Fault]:
    """The faults, in order, somewhere between 5 % and 95 % of the submissions (pure)."""
    kinds = (
        ["worker"] * options.worker_kills
        + ["supervisor"] * options.supervisor_kills
        + ["restart"] * options.restarts
    )
    rng.shuffle(kinds)
    marks = sorted(
        rng.randrange(options.messages // 20, max(1, options.messages * 19 // 20)) for _ in kinds
    )
    return [
        Fault(at, kind, rng.randrange(options.tenants))
        for at, kind in zip(marks, kinds, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class Submission:
    domain: str
    uid: int
    message_id: str
    recipients: tuple[str, ...]
    body: bytes


def submissions(hosting: Hosting, tenants: tuple[TenantSpec, ...], count: int) -> list[Submission]:
    """`count` messages, tenants taking turns; every fifth has a second recipient, one in
    TARPIT_EVERY a recipient at the tarpit."""
    run = secrets.token_hex(4)
    result = []
    for i in range(count):
        tenant = tenants[i % len(tenants)]
        sender = f"alice@{tenant.domain}"
        message_id = f"<soak-{i}-{run}@{tenant.domain}>"
        recipients = (f"r{i}@rcpt.test",) + ((f"s{i}@rcpt.test",) if i % 5 == 0 else ())
        recipients += (f"t{i}@{TARPIT.domain}",) if i % TARPIT_EVERY == 3 else ()
        body = (
            f"From: {sender}\nTo: {', '.join(recipients)}\nSubject: soak {i}\n"
            f"Message-ID: {message_id}\n\nmessage {i}\n"
        ).encode()
        result.append(
            Submission(tenant.domain, hosting.uid(tenant.domain), message_id, recipients, body)
        )
    return result


class Submitter:
    """Runs the real sendmail as each message's tenant, `parallel` at a time, in threads."""

    def __init__(self, hosting: Hosting, parallel: int) -> None:
        self.env = {"NSMAIL_CONFIG": str(hosting.config_path), "PATH": "/usr/bin:/bin"}
        self.parallel = parallel
        self.lock = threading.Lock()
        self.accepted: list[Submission] = []
        self.failures: list[str] = []
        self.finished = 0

    def start(self, work: list[Submission]) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        thread.start()
        return thread

    def _run(self, work: list[Submission]) -> None:
        with ThreadPoolExecutor(self.parallel) as pool:
            for _ in pool.map(self._one, work):
                pass

    def _one(self, s: Submission) -> None:
        try:
            done = subprocess.run(
                [SENDMAIL, "-i", "-f", f"alice@{s.domain}", *s.recipients],
                input=s.body,
                user=s.uid,
                group=s.uid,
                extra_groups=[],
                env=self.env,
                capture_output=True,
                timeout=120,
                check=False,
            )
            failure = (
                f"exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}"
                if done.returncode
                else None
            )
        except subprocess.TimeoutExpired:
            failure = "no exit within 120 s"
        with self.lock:
            self.finished += 1
            if failure is None:
                self.accepted.append(s)
            else:
                self.failures.append(f"{s.domain} {s.message_id}: {failure}")


class Injector:
    """Carries out the plan of faults as submissions progress."""

    def __init__(
        self,
        hosting: Hosting,
        tenants: tuple[TenantSpec, ...],
        faults: list[Fault],
        say: Callable[[str], None],
    ) -> None:
        self.hosting = hosting
        self.say = say
        self.tenants = tenants
        self.pending = list(faults)
        self.done: Counter[str] = Counter()
        self.killed: set[int] = set()

    def tick(self, finished: int) -> None:
        """Carry out every due fault; a worker kill waits while that worker is down."""
        while self.pending and self.pending[0].at <= finished:
            fault = self.pending[0]
            if fault.kind == "worker" and not self._kill_worker(self.tenants[fault.tenant]):
                return
            if fault.kind == "supervisor":
                self._kill_supervisor()
            elif fault.kind == "restart":
                self._restart_supervisor()
            self.pending.pop(0)
            self.done[fault.kind] += 1

    def _kill_worker(self, tenant: TenantSpec) -> bool:
        worker = self.hosting.status()[tenant.domain]
        pid = worker["pid"]
        if worker["state"] not in LIVE or pid is None or pid in self.killed:
            return False  # backing off, or not yet reported as restarted
        # Only a live process of the tenant's uid: never a recycled pid.
        with contextlib.suppress(FileNotFoundError):
            if self.hosting.proc_uid(pid) == self.hosting.uid(tenant.domain):
                os.kill(pid, signal.SIGKILL)
                self.killed.add(pid)
                self.say(f"soak: killed {tenant.domain}'s worker {pid}")
                return True
        return False

    def _kill_supervisor(self) -> None:
        proc = self.hosting.proc
        assert proc is not None
        # nsenter execs the supervisor: the Popen's pid is the supervisor's own.
        assert "supervise" in Path(f"/proc/{proc.pid}/cmdline").read_text()
        proc.kill()
        proc.wait()
        time.sleep(RESTART_SEC)
        self._start()
        self.say(f"soak: killed the supervisor {proc.pid}; a new one is ready")

    def _restart_supervisor(self) -> None:
        code = self.hosting.stop(timeout=60)
        if code != 0:
            raise AssertionError(f"the supervisor stopped with {code}:\n{self.hosting.log()}")
        self._start()
        self.say("soak: restarted the supervisor (SIGTERM); a new one is ready")

    def _start(self) -> None:
        self.hosting.drain_notify()  # what the old one said must not pass for READY=1
        self.hosting.start(timeout=120)


@dataclass(frozen=True, slots=True)
class Notice:
    """One DSN in a sender's Maildir: the returned message, its action and recipients."""

    message_id: str
    action: str
    recipients: dict[str, str]  # Final-Recipient address -> Status


class Ledger:
    """What the receiver stored and what came back to the senders, read incrementally."""

    def __init__(self, hosting: Hosting, server: RudeSmtp, tenants: tuple[TenantSpec, ...]):
        self.hosting = hosting
        self.server = server
        self.tenants = tenants
        self._notices: dict[Path, Notice] = {}  # Maildir files never change once in new/
        self.records: list[dict[str, Any]] = []

    def refresh(self) -> None:
        self.records = self.server.records()
        for tenant in self.tenants:
            new = self.hosting.home(tenant.domain) / "mail" / "alice" / "new"
            for path in new.iterdir() if new.is_dir() else ():
                if path not in self._notices:
                    self._notices[path] = read_notice(path)

    @property
    def notices(self) -> list[Notice]:
        return list(self._notices.values())

    def received(self) -> Counter[Pair]:
        return Counter((r["message_id"], to) for r in self.records for to in r["rcpt_to"])

    def acknowledged(self) -> Counter[Pair]:
        return Counter(
            (r["message_id"], to) for r in self.records if r["acked"] for to in r["rcpt_to"]
        )

    def bounced(self) -> Counter[Pair]:
        return Counter(
            (n.message_id, to) for n in self.notices if n.action == "failed" for to in n.recipients
        )


def read_notice(path: Path) -> Notice:
    notice = as_notice(email.message_from_bytes(path.read_bytes(), policy=email.policy.default))
    assert notice is not None, f"{path} is no DSN"
    return notice


def as_notice(report: Message) -> Notice | None:
    """The DSN in `report`, or None if it is none."""
    if report.get_content_type() != "multipart/report":
        return None
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks: list[Message] = status.get_payload()  # type: ignore[assignment]
    recipients = {
        str(b["Final-Recipient"]).partition(";")[2].strip(): str(b["Status"]) for b in blocks[1:]
    }
    actions = {str(b["Action"]) for b in blocks[1:]}
    return Notice(_returned_message_id(report), ",".join(sorted(actions)), recipients)


def _returned_message_id(report: Message) -> str:
    for part in report.walk():
        if part.get_content_type() == "message/rfc822":
            payload: list[Message] = part.get_payload()  # type: ignore[assignment]
            return str(payload[0]["Message-ID"])
        if part.get_content_type() == "text/rfc822-headers":
            headers: bytes = part.get_payload(decode=True)  # type: ignore[assignment]
            return str(email.message_from_bytes(headers)["Message-ID"])
    return ""


def spool_counts(hosting: Hosting, tenants: tuple[TenantSpec, ...]) -> Counter[str]:
    """Queue files in each state over all tenants (in-progress sendmail dot files too)."""
    counts: Counter[str] = Counter()
    for tenant in tenants:
        spool = hosting.home(tenant.domain) / SPOOL_IN_HOME
        for state in STATES:
            with contextlib.suppress(FileNotFoundError):
                counts[state] += len(os.listdir(spool / state))
    return counts


def queued_pairs(hosting: Hosting, tenants: tuple[TenantSpec, ...]) -> set[Pair]:
    """Every pair some queue file still holds: as a message, or as the DSN about it."""
    pairs = set()
    for tenant in tenants:
        spool = hosting.home(tenant.domain) / SPOOL_IN_HOME
        for state in STATES:
            for path in (spool / state).glob("*") if (spool / state).is_dir() else ():
                with contextlib.suppress(FileNotFoundError, QueueFileError):
                    envelope, body = decode(path.read_bytes())
                    message = email.message_from_bytes(body, policy=email.policy.default)
                    notice = as_notice(message)
                    if notice is not None:
                        pairs |= {(notice.message_id, r) for r in notice.recipients}
                    else:
                        pairs |= {(str(message["Message-ID"]), r) for r in envelope.recipients}
    return pairs


def soak(options: Options, say: Callable[[str], None]) -> Figures:
    """One soak run in a lab of its own; the figures, with what went wrong in `problems`."""
    figures = Figures(options.seed, options.tenants)
    started = time.monotonic()
    with Lab() as lab:
        tenants = soak_tenants(options.tenants)
        Nsd(lab, dns_records(tenants) + TARPIT.records())
        server = RudeSmtp(lab, seed=options.seed, stall=STALL, tarpit=TARPIT)
        hosting = Hosting(lab)
        hosting.write_config(tenants, **DELIVERY, lifetime=options.lifetime)
        hosting.start(timeout=120)
        say(f"soak: seed {options.seed}, {options.tenants} tenants up, lab {lab.prefix}")
        injector = Injector(hosting, tenants, plan(options, random.Random(options.seed)), say)
        submitter = Submitter(hosting, options.submitters)
        ledger = Ledger(hosting, server, tenants)
        thread = submitter.start(submissions(hosting, tenants, options.messages))
        for _ in _every(PROGRESS_EVERY, lambda: not thread.is_alive(), say, ledger, submitter):
            injector.tick(submitter.finished)
        # Whatever is still due, such as a second kill of a worker that is not back yet.
        waited = time.monotonic() + FAULTS_WAIT
        for _ in _every(
            PROGRESS_EVERY,
            lambda: not injector.pending or time.monotonic() > waited,
            say,
            ledger,
            submitter,
        ):
            injector.tick(options.messages)
        say(f"soak: all submitted; faults {dict(injector.done)}; settling")
        settle = Settle(hosting, tenants, ledger, _pairs(submitter.accepted), options.settle)
        for _ in _every(PROGRESS_EVERY, settle.over, say, ledger, submitter):
            pass
        _account(figures, hosting, tenants, ledger, submitter, injector)
        _check_workers(figures, hosting, tenants)
        code = hosting.stop(timeout=60)
        if code != 0:
            figures.problems.append(f"the supervisor stopped with status {code}")
        if "Traceback" in hosting.log():
            figures.problems.append("a Traceback in the supervisor's log")
        if figures.problems:
            figures.problems.append(f"supervisor log (tail):\n{hosting.log()[-3000:]}")
    figures.wall_seconds = round(time.monotonic() - started, 1)
    return figures


def _every(
    seconds: float,
    done: Callable[[], bool],
    say: Callable[[str], None],
    ledger: Ledger,
    submitter: Submitter,
) -> Iterator[None]:
    """Yield every 0.2 s until `done`, saying how things stand every `seconds`."""
    next_line = time.monotonic() + seconds
    while not done():
        yield
        if time.monotonic() >= next_line:
            next_line += seconds
            ledger.refresh()
            pairs = _pairs(submitter.accepted)
            acked = set(ledger.acknowledged())
            bounced = set(ledger.bounced())
            say(
                f"soak: submitted {submitter.finished} ({len(submitter.failures)} failed)"
                f", pairs {len(pairs)}: delivered {len(pairs & acked)}"
                f", bounced {len(pairs & bounced)}, open {len(pairs - acked - bounced)}"
            )
        time.sleep(0.2)


def _pairs(accepted: list[Submission]) -> set[Pair]:
    return {(s.message_id, r) for s in accepted for r in s.recipients}


class Settle:
    """Whether waiting for the queues to settle is over: every pair delivered or bounced
    and the queues empty; or the queues empty for EMPTY_FOR (what is open now is lost);
    or the time is up."""

    EMPTY_FOR = 10.0

    def __init__(
        self,
        hosting: Hosting,
        tenants: tuple[TenantSpec, ...],
        ledger: Ledger,
        expected: set[Pair],
        timeout: float,
    ) -> None:
        self.hosting = hosting
        self.tenants = tenants
        self.ledger = ledger
        self.expected = expected
        self.deadline = time.monotonic() + timeout
        self.empty_since: float | None = None

    def over(self) -> bool:
        now = time.monotonic()
        counts = spool_counts(self.hosting, self.tenants)
        del counts[CORRUPT]  # kept there for good, and reported
        if any(counts.values()):
            self.empty_since = None
            return now > self.deadline
        if self.empty_since is None:
            self.empty_since = now
        self.ledger.refresh()
        done = set(self.ledger.acknowledged()) | set(self.ledger.bounced())
        return self.expected <= done or now - self.empty_since > self.EMPTY_FOR


def _account(
    figures: Figures,
    hosting: Hosting,
    tenants: tuple[TenantSpec, ...],
    ledger: Ledger,
    submitter: Submitter,
    injector: Injector,
) -> None:
    ledger.refresh()
    pairs = _pairs(submitter.accepted)
    received, acked, bounced = ledger.received(), ledger.acknowledged(), ledger.bounced()
    open_pairs = {p for p in pairs if not acked[p] and not bounced[p]}
    still_queued = queued_pairs(hosting, tenants) if open_pairs else set()
    counts = spool_counts(hosting, tenants)
    figures.messages = len(submitter.accepted)
    figures.pairs = len(pairs)
    figures.tarpit_pairs = sum(1 for _, to in pairs if to.endswith(f"@{TARPIT.domain}"))
    figures.delivered = sum(1 for p in pairs if acked[p])
    figures.bounced = sum(1 for p in pairs if bounced[p])
    figures.delivered_and_bounced = sum(1 for p in pairs if acked[p] and bounced[p])
    figures.duplicates = sum(received.values()) - len(received)
    figures.acknowledged_twice = sum(1 for n in acked.values() if n > 1)
    figures.bounced_twice = sum(1 for n in bounced.values() if n > 1)
    figures.unsettled = len(open_pairs & still_queued)
    figures.lost = len(open_pairs - still_queued)
    figures.worker_kills = injector.done["worker"]
    figures.supervisor_kills = injector.done["supervisor"]
    figures.restarts = injector.done["restart"]
    figures.sendmail_failures = len(submitter.failures)
    figures.corrupt = counts[CORRUPT]
    figures.bounce_statuses = dict(
        Counter(s for n in ledger.notices if n.action == "failed" for s in n.recipients.values())
    )
    figures.behaviours = dict(Counter(r["behaviour"] for r in ledger.records))
    problems = figures.problems
    if figures.lost:
        examples = sorted(open_pairs - still_queued)[:3]
        where = {m: _files_naming(hosting, tenants, m) for m, _ in examples}
        problems.append(f"lost {figures.lost}, e.g. {examples}; files naming them: {where}")
    if figures.unsettled:
        problems.append(f"{figures.unsettled} pairs still queued: {dict(counts)}")
    if figures.corrupt:
        problems.append(f"{figures.corrupt} queue files quarantined in corrupt/")
    if submitter.failures:
        problems.append(
            f"sendmail failed {len(submitter.failures)} times: {submitter.failures[:3]}"
        )
    if sum(1 for p in received if p not in pairs):
        problems.append("the receiver holds mail that was never accepted by sendmail")
    if injector.pending:
        problems.append(f"faults never carried out: {injector.pending}")


def _files_naming(hosting: Hosting, tenants: tuple[TenantSpec, ...], message_id: str) -> list[str]:
    """Spool files (any state, partial ones too) holding `message_id`: where a lost one was."""
    needle = message_id.encode()
    found = []
    for tenant in tenants:
        spool = hosting.home(tenant.domain) / SPOOL_IN_HOME
        for path in spool.glob("*/*"):
            with contextlib.suppress(OSError):
                if needle in path.read_bytes():
                    found.append(str(path.relative_to(spool)))
    return found


def _check_workers(figures: Figures, hosting: Hosting, tenants: tuple[TenantSpec, ...]) -> None:
    """Every worker up, of its tenant's uid, and idle (a worker still "delivering" with
    nothing left to deliver is stuck)."""
    deadline = time.monotonic() + IDLE_WAIT
    while True:
        status = hosting.status()
        wrong = {
            t.domain: (w["state"], w["pid"])
            for t in tenants
            if (w := status[t.domain])["state"] != "idle" or not _alive(hosting, w["pid"], t)
        }
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if wrong:
        figures.problems.append(f"workers not up and idle after {IDLE_WAIT:.0f} s: {wrong}")


def _alive(hosting: Hosting, pid: int | None, tenant: TenantSpec) -> bool:
    try:
        return pid is not None and hosting.proc_uid(pid) == hosting.uid(tenant.domain)
    except FileNotFoundError:
        return False


ROWS = (
    ("messages", "messages accepted by sendmail"),
    ("pairs", "(message, recipient) pairs"),
    ("tarpit_pairs", "of them for the tarpit"),
    ("delivered", "delivered (acknowledged)"),
    ("bounced", "bounced (DSN to the sender)"),
    ("delivered_and_bounced", "both delivered and bounced"),
    ("duplicates", "duplicates at the receiver"),
    ("acknowledged_twice", "pairs acknowledged twice"),
    ("bounced_twice", "pairs bounced twice"),
    ("lost", "lost"),
    ("unsettled", "still queued at the end"),
    ("corrupt", "quarantined (corrupt/)"),
    ("worker_kills", "worker kills (SIGKILL)"),
    ("supervisor_kills", "supervisor kills (SIGKILL)"),
    ("restarts", "supervisor restarts (SIGTERM)"),
    ("sendmail_failures", "sendmail failures"),
    ("wall_seconds", "wall time (s)"),
)


def table(figures: Figures) -> str:
    lines = [f"{label:<32} {getattr(figures, name):>10}" for name, label in ROWS]
    lines.append(f"{'seed':<32} {figures.seed:>10}")
    lines.append(f"bounce statuses {figures.bounce_statuses}")
    lines.append(f"stored by fate  {figures.behaviours}")
    lines += [f"PROBLEM: {p}" for p in figures.problems]
    lines.append("FAILED" if figures.problems else "PASSED")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.partition("\n")[0])
    defaults = Options()
    parser.add_argument("--tenants", type=int, default=defaults.tenants)
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument("--worker-kills", type=int, default=defaults.worker_kills)
    parser.add_argument("--supervisor-kills", type=int, default=defaults.supervisor_kills)
    parser.add_argument("--restarts", type=int, default=defaults.restarts)
    parser.add_argument("--submitters", type=int, default=defaults.submitters)
    parser.add_argument("--settle", type=float, default=defaults.settle, metavar="SECONDS")
    parser.add_argument("--lifetime", type=float, default=defaults.lifetime, metavar="SECONDS")
    parser.add_argument("--seed", type=int, help="replay a run (default: NSMAIL_SOAK_SEED)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root")
    seed = args.seed
    if seed is None:
        seed = int(os.environ.get("NSMAIL_SOAK_SEED") or secrets.randbelow(1 << 30))
    options = Options(
        args.tenants,
        args.messages,
        args.worker_kills,
        args.supervisor_kills,
        args.restarts,
        args.submitters,
        seed,
        args.settle,
        args.lifetime,
    )
    figures = soak(options, lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(asdict(figures), indent=2) if args.json else table(figures))
    return 1 if figures.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
