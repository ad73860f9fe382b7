"""`scripts/bench`: measure nsmail on this machine and print a table (or --json).

    scripts/bench [throughput options]   delivery throughput (instant, slow and tarpit
                                         receivers, many destinations), sendmail latency
                                         and CPU per message, nsmail against a Postfix
                                         baseline
    scripts/bench tenants [--tenants K ...]
                                         tenant bring-up and tear-down, memory per worker
    scripts/bench memory [--messages N]  a worker's memory with N messages queued for a
                                         dead destination
    scripts/bench smtp [--clients C --messages M ...]
                                         submission over SMTP to localhost, end to end,
                                         against Postfix's smtpd (bench.smtp)

`--quick` (throughput) is a smoke test: a few messages, checked one by one; it exits
non-zero when any message is missing or arrived with the wrong identity, never because
of a time. `python -m bench submit SPEC` is internal: the sendmail runner of throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# The lab and the hosting harness are shared with the end-to-end tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from bench import smtp
from bench.memory import measure_memory
from bench.memory import table as memory_table
from bench.submit import submit_main
from bench.tenants import measure_tenants
from bench.throughput import Options, measure_throughput, table

QUICK = Options(messages=40, repeat=1, slow_messages=10, destinations=10, timeout=60.0)


def tenants_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench tenants", description=__doc__)
    parser.add_argument(
        "--tenants",
        type=int,
        nargs="+",
        default=[100, 1000],
        metavar="K",
        help="tenant counts for bring-up/tear-down (default: 100 1000)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    rows = []
    for count in args.tenants:
        print(f"bench: bringing up {count} tenants...", file=sys.stderr, flush=True)
        rows.append(measure_tenants(count))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'tenants':>8} {'up (s)':>8} {'down (s)':>9} {'MiB/running idle worker':>24}"
        f" {'MiB/asleep tenant':>18}"
    )
    for r in rows:
        print(
            f"{r['tenants']:>8} {r['up_seconds']:>8.2f} {r['down_seconds']:>9.2f} "
            f"{r['uss_mib_per_idle_worker']:>24.2f} {r['mib_per_asleep_tenant']:>18.3f}"
        )
    return 0


def memory_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench memory", description=__doc__)
    parser.add_argument(
        "--messages", type=int, default=10_000, metavar="N", help="messages queued (10000)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    report = measure_memory(args.messages, lambda text: print(f"bench: {text}", file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else memory_table(report))
    return 0 if report["ok"] else 1


def throughput_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Options()
    for name, metavar, help_text in (
        ("messages", "N", "messages per measurement of (a), (b) and (i), over all tenants"),
        ("tenants", "K", "tenants (and parallel sendmail submitters)"),
        ("size", "BYTES", "size of each message"),
        ("repeat", "R", "rounds per system; the table shows medians"),
        ("slow-messages", "G", "messages to the slow receiver in (g)"),
        ("destinations", "D", "recipient domains in (i)"),
    ):
        default = getattr(defaults, name.replace("-", "_"))
        parser.add_argument(
            f"--{name}", type=int, default=default, metavar=metavar, help=f"{help_text} ({default})"
        )
    parser.add_argument(
        "--phases",
        default=defaults.phases,
        metavar="LETTERS",
        help=f"which figures to measure ({defaults.phases}; b brings a, whose daemon it uses)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK.messages} messages, one round; checks delivery, not time",
    )
    args = parser.parse_args(argv)
    options = Options(
        args.messages,
        args.tenants,
        args.size,
        args.repeat,
        args.slow_messages,
        args.destinations,
        phases=args.phases,
    )
    if args.quick:
        options = dataclasses.replace(
            QUICK, tenants=args.tenants, size=args.size, phases=args.phases
        )
    report = measure_throughput(options, lambda text: print(f"bench: {text}", file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0 if report["ok"] else 1


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["tenants"]:
        return tenants_main(argv[1:])
    if argv[:1] == ["memory"]:
        return memory_main(argv[1:])
    if argv[:1] == ["submit"]:
        return submit_main(argv[1])
    if argv[:1] == ["smtp"]:
        return smtp.main(argv[1:])
    if argv[:1] == ["smtp-client"]:
        return smtp.client_main(argv[1])
    return throughput_main(argv)


if __name__ == "__main__":
    sys.exit(main())
