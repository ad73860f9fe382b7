"""`scripts/bench`: measure nsmail on this machine and print a table (or --json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The lab and the hosting harness are shared with the end-to-end tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.tenants import measure_tenants


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument(
        "--tenants",
        type=int,
        nargs="+",
        default=[100, 1000],
        metavar="K",
        help="tenant counts for bring-up/tear-down (default: 100 1000)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    rows = []
    for count in args.tenants:
        print(f"bench: bringing up {count} tenants...", file=sys.stderr, flush=True)
        rows.append(measure_tenants(count))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'tenants':>8} {'up (s)':>8} {'down (s)':>9} {'USS/idle worker (MiB)':>22}")
    for r in rows:
        print(
            f"{r['tenants']:>8} {r['up_seconds']:>8.2f} {r['down_seconds']:>9.2f} "
            f"{r['uss_mib_per_idle_worker']:>22.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
