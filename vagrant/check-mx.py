"""On the mx: did every tenant's mail, and the hosting machine's, arrive under its own identity?

For each sender domain it waits for the message of this run and checks the Received header
Postfix wrote: ``from D (D [A])`` with D the domain (HELO and verified client name) and A
one of the domain's own addresses. Exit 1 with one line per failure; the maillog helps.
"""

import email
import email.policy
import re
import sys
import time
from pathlib import Path

MAILDIR = Path("/var/mail/rig/Maildir")
RECEIVED = re.compile(r"from (\S+) \((\S+) \[(?:IPv6:)?([^\]]+)\]\)")


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


def expected(env: dict[str, str]) -> dict[str, set[str]]:
    """Each sending domain's own addresses."""
    result = {env["RIG_HOST_NAME"]: {env["RIG_HOST_V4"], env["RIG_HOST_V6"]}}
    for tenant in env["RIG_TENANTS"].split():
        domain, *addresses = tenant.split(",")
        result[domain] = {a for a in addresses if a}
    return result


def arrived(run: str) -> dict[str, str]:
    """The first Received header of each message of this run, by sender domain."""
    found = {}
    for path in (p for sub in ("new", "cur") for p in (MAILDIR / sub).glob("*")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        words = str(message["Subject"] or "").split()
        if len(words) == 3 and words[:2] == ["rig", run]:
            found[words[2]] = " ".join(str(message["Received"]).split())
    return found


def main() -> int:
    run, timeout = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 120
    want = expected(read_env(Path("/etc/default/nsmail-rig")))
    deadline = time.monotonic() + timeout
    while len(found := arrived(run)) < len(want) and time.monotonic() < deadline:
        time.sleep(1)
    failures = []
    for domain, addresses in want.items():
        received = found.get(domain)
        match = RECEIVED.match(received or "")
        if received is None:
            failures.append(f"{domain}: nothing arrived in {timeout:.0f} s")
        elif not match or match[1] != domain or match[2] != domain or match[3] not in addresses:
            failures.append(f"{domain}: arrived as '{received}', not from its own name/address")
        else:
            print(f"ok  {domain:10} {match[0]}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
