"""`scripts/bench smtp`: submission over SMTP to localhost, end to end, against Postfix's smtpd.

The workload of issue 17: C clients (4) send M messages each (500) over one SMTP
connection each (connection reuse, as an app's mailer keeps its session), half of them
as each of 2 tenants' users, to the machine's own SMTP listener on 127.0.0.1:25, and
the messages go on to the same `smtp-sink` as `scripts/bench`'s (the same check, message
by message: each exactly once, from its tenant's address, with its EHLO name).

- nsmail: its local listener; each client runs as its tenant's uid, and the kernel's word
  on that uid is all the identification there is.
- Postfix: `smtpd` on 127.0.0.1:25 (`inet_interfaces = loopback-only`, `mynetworks` the
  loopback, as Debian's Postfix takes local mail), in the baseline's namespace with the
  tenants' addresses and the per-tenant transports of `bench.postfix_baseline`.

Figures: (s) messages per second from the first client's first command to the sink
holding all C x M; (l) submission latency p50 and p99, per message, from MAIL FROM to
the reply after the final dot (250 means it is on disk for both); CPU seconds per 1000
messages of the receiving system's process tree. The systems' rounds take turns, as in
`bench.throughput`. `--quick` checks delivery, never time.

Security: benchmark infrastructure, runs as root; everything lives in the lab's
namespaces and temporary directory, and each client drops to its tenant's uid.
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hosting import Hosting, dns_records
from lab import Lab, Nsd

from bench.arrivals import Sink, collect, message, name_of, sender, wait_for
from bench.postfix_baseline import SendingPostfix
from bench.processes import tree_cpu
from bench.throughput import RECIPIENT_DOMAIN, bench_tenants, compare, percentile
from bench.throughput import _cell as cell

QUICK = (2, 10)  # clients, messages each
RECIPIENT = f"sink@{RECIPIENT_DOMAIN}"


@dataclass(frozen=True, slots=True)
class Options:
    clients: int = 4
    messages: int = 500  # per client
    tenants: int = 2
    size: int = 2000
    repeat: int = 1

    @property
    def total(self) -> int:
        return self.clients * self.messages

    @property
    def wait(self) -> float:
        return 60 + self.total * 0.1


@dataclass(frozen=True, slots=True)
class Client:
    """One client of `python -m bench smtp-client`: a uid, a tenant, its share."""

    uid: int
    domain: str
    first: int  # sequence number of its first message
    count: int

    @property
    def seqs(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass
class Round:
    rate: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_per_1000: float | None = None
    problems: list[str] = field(default_factory=list)


# -- the clients ---------------------------------------------------------------------------


def client_main(spec_path: str) -> int:
    """`python -m bench smtp-client SPEC`: run the clients in parallel, each as its uid,
    each over one connection; print when the first began and every latency, as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    children = []
    for raw in spec["clients"]:
        client = Client(**raw)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            code = 1
            try:
                os.setgroups([])
                os.setresgid(client.uid, client.uid, client.uid)
                os.setresuid(client.uid, client.uid, client.uid)
                result = _one_client(client, spec["tag"], spec["size"])
                os.write(write, json.dumps(result).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        children.append((pid, read))
    results = []
    for pid, read in children:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        results.append(
            json.loads(data) if data else {"started": None, "latencies": [], "failures": ["died"]}
        )
    starts = [r["started"] for r in results if r["started"] is not None]
    print(
        json.dumps(
            {
                "first": min(starts) if starts else None,
                "latencies": [x for r in results for x in r["latencies"]],
                "failures": [f for r in results for f in r["failures"]][:5],
            }
        )
    )
    return 0


def _one_client(client: Client, tag: str, size: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[str] = []
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", 25, local_hostname="app.test", timeout=60) as smtp:
        for seq in client.seqs:
            body = message(tag, client.domain, seq, size, RECIPIENT).replace(b"\n", b"\r\n")
            begun = time.monotonic()
            try:
                smtp.sendmail(sender(client.domain), [RECIPIENT], body)
            except smtplib.SMTPException as e:
                failures.append(f"{client.domain} {seq}: {e}")
            latencies.append(time.monotonic() - begun)
    return {"started": started, "latencies": latencies, "failures": failures}


def _run_clients(
    lab: Lab, namespace: str, clients: list[Client], tag: str, size: int, work: Path
) -> subprocess.Popen[bytes]:
    fd, path = tempfile.mkstemp(suffix=".json", dir=work)
    with os.fdopen(fd, "w") as f:
        json.dump({"clients": [asdict(c) for c in clients], "tag": tag, "size": size}, f)
    top = Path(__file__).resolve().parent.parent
    argv = lab.nsenter(namespace, [sys.executable, "-m", "bench", "smtp-client", path])
    return subprocess.Popen(argv, cwd=top, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _clients(hosting: Hosting, options: Options) -> list[Client]:
    """Client i sends as tenant i mod T; each tenant's clients share its sequence numbers."""
    tenants = bench_tenants(options.tenants)
    made: list[Client] = []
    for i in range(options.clients):
        tenant = tenants[i % options.tenants]
        earlier = sum(1 for c in made if c.domain == tenant.domain)
        made.append(
            Client(
                hosting.uid(tenant.domain),
                tenant.domain,
                earlier * options.messages,
                options.messages,
            )
        )
    return made


# -- Postfix with smtpd --------------------------------------------------------------------


class ListeningPostfix(SendingPostfix):
    """The baseline of `bench.postfix_baseline`, with `smtpd` on the loopback."""

    def _write_config(self) -> None:
        super()._write_config()
        with (self.etc / "master.cf").open("a") as f:
            f.write("smtp      inet  n       -       n       -       -       smtpd\n")
        with (self.etc / "main.cf").open("a") as f:
            f.write(
                "inet_interfaces = loopback-only\n"
                "mynetworks = 127.0.0.0/8 [::1]/128\n"
                "smtpd_relay_restrictions = permit_mynetworks, reject\n"
            )
        past = time.time() - 60  # as the base class: Postfix rereads a young main.cf
        for path in self.etc.iterdir():
            os.utime(path, (past, past))


# -- the rounds ----------------------------------------------------------------------------


def _round(
    lab: Lab,
    sink: Sink,
    options: Options,
    clients: list[Client],
    tag: str,
    namespace: str,
    root: int,
    work: Path,
) -> Round:
    round_ = Round()
    before = tree_cpu(root)
    proc = _run_clients(lab, namespace, clients, tag, options.size, work)
    _, last = wait_for(sink, options.total, options.wait)
    used = tree_cpu(root) - before
    out, err = proc.communicate(timeout=options.wait)
    if proc.returncode != 0:
        round_.problems.append(f"clients failed: {err.decode(errors='replace')[-2000:]}")
        return round_
    result = json.loads(out)
    round_.problems += result["failures"]
    expected = {name_of(tag, c.domain, seq) for c in clients for seq in c.seqs}
    check, _ = collect(sink, expected, bench_tenants(options.tenants))
    if not check.ok:
        round_.problems.append(f"check failed: {check}")
    if last is None or result["first"] is None:
        round_.problems.append(f"only {check.received} of {options.total} arrived in time")
        return round_
    round_.rate = options.total / (last - result["first"])
    round_.cpu_per_1000 = used / options.total * 1000
    if result["latencies"]:
        round_.p50_ms = percentile(result["latencies"], 50) * 1000
        round_.p99_ms = percentile(result["latencies"], 99) * 1000
    return round_


def measure(options: Options, log: Callable[[str], None]) -> dict[str, Any]:
    with Lab() as lab:
        tenants = bench_tenants(options.tenants)
        Nsd(lab, dns_records(tenants))
        sink = Sink(lab)
        hosting = Hosting(lab)
        hosting.write_config(tenants)
        work = lab.tempdir("bench-smtp")
        clients = _clients(hosting, options)
        postfix = ListeningPostfix(lab, tenants)
        ours, theirs = [], []
        # Rounds take turns, as bench.throughput's do.
        for r in range(options.repeat):
            log(f"nsmail round {r}: {options.clients} clients x {options.messages} over SMTP")
            hosting.start(timeout=60)
            assert hosting.proc is not None
            ours.append(
                _round(
                    lab,
                    sink,
                    options,
                    clients,
                    f"nsmail-smtp-r{r}",
                    lab.host,
                    hosting.proc.pid,
                    work,
                )
            )
            hosting.stop(timeout=60)
            log(f"postfix round {r}: the same through its smtpd")
            master = postfix.started(postfix.start())
            theirs.append(
                _round(lab, sink, options, clients, f"postfix-smtp-r{r}", postfix.ns, master, work)
            )
            postfix.stop()
    return _report(options, ours, theirs)


FIGURES: tuple[tuple[str, str, Callable[[Round], float | None], bool], ...] = (
    ("(s) end to end over SMTP", "msg/s", lambda r: r.rate, True),
    ("(l) submission latency p50", "ms", lambda r: r.p50_ms, False),
    ("(l) submission latency p99", "ms", lambda r: r.p99_ms, False),
    ("(f) CPU per 1000 msgs", "s", lambda r: r.cpu_per_1000, False),
)


def _report(options: Options, ours: Sequence[Round], theirs: Sequence[Round]) -> dict[str, Any]:
    return {"options": asdict(options), **compare(FIGURES, ours, theirs)}


def table(report: dict[str, Any]) -> str:
    o = report["options"]
    lines = [
        f"{o['clients']} clients x {o['messages']} messages of {o['size']} bytes over SMTP to "
        f"127.0.0.1:25 from {o['tenants']} tenants, one connection each, median of "
        f"{o['repeat']}; every message checked: " + ("ok" if report["ok"] else "FAILED"),
        f"{'figure':<38} {'nsmail':>9} {'postfix':>9}  ratio (>1: nsmail better)",
    ]
    for row in report["rows"]:
        label = f"{row['figure']} ({row['unit']})"
        mine, base, ratio = cell(row["nsmail"]), cell(row["postfix"]), cell(row["ratio"], "x")
        lines.append(f"{label:<38} {mine:>9} {base:>9}  {ratio}")
    lines += [f"PROBLEM: {p}" for p in report["problems"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench smtp", description=__doc__.split("\n\n")[0]
    )
    defaults = Options()
    for name, help_text in (
        ("clients", "SMTP clients, one connection each"),
        ("messages", "messages per client"),
        ("tenants", "tenants the clients are users of"),
        ("size", "bytes per message"),
        ("repeat", "rounds per system; the table shows medians"),
    ):
        default = getattr(defaults, name)
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{help_text} ({default})")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: checks delivery, not time"
    )
    args = parser.parse_args(argv)
    options = Options(args.clients, args.messages, args.tenants, args.size, args.repeat)
    if args.quick:
        options = Options(*QUICK, args.tenants, args.size, 1)
    report = measure(options, lambda text: print(f"bench: {text}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0 if report["ok"] else 1
