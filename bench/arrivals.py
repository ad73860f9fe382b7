"""What the benchmarks' messages are, where they arrive, and whether each arrived right.

A message is named by its last line, ``end <tag> <domain> <seq>`` (run, sending tenant,
number), and by its Subject. The receivers dump every transaction to a file of its own
headed by ``X-Client-Addr``, ``X-Helo-Args`` and ``X-Mail-Args``: Postfix's ``smtp-sink
-d`` (the instant receiver: one event-driven C process, the speed ceiling) and the lab's
slow receiver (``lab.receivers.SlowSmtp``) alike. A run is checked message by message:
each one expected must arrive exactly once, from one of its tenant's addresses, with EHLO
the tenant's name and MAIL FROM the tenant's sender, or the run fails, so a fast wrong
answer cannot win. The check reads the dumps after the clock stops; a dump is complete
when it holds the message's last line.

Security: benchmark infrastructure, runs as root; the sink runs as nobody in the lab's
internet namespace.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hosting import TenantSpec
from lab import MX_V4, MX_V6, Lab, LabError

from bench.processes import tree_cpu

_POLL = 0.005


def sender(domain: str) -> str:
    return f"alice@{domain}"


def name_of(tag: str, domain: str, seq: int) -> str:
    """What message `seq` of tenant `domain` in run `tag` is called."""
    return f"{tag} {domain} {seq}"


def message(tag: str, domain: str, seq: int, size: int, recipient: str) -> bytes:
    """Message `seq` of `domain` in run `tag`, about `size` bytes; its last line names it."""
    name = name_of(tag, domain, seq)
    head = f"From: {sender(domain)}\nTo: {recipient}\nSubject: bench {name}\n\n"
    last = f"end {name}\n"
    filler = max(0, size - len(head) - len(last))
    lines, rest = divmod(filler, 76)
    body = ("x" * 75 + "\n") * lines + ("y" * (rest - 1) + "\n" if rest else "")
    return (head + body + last).encode()


class Receiver(Protocol):
    """Where dumps of transactions appear: the sink, or the slow receiver."""

    def count(self) -> int: ...

    def dumped(self) -> list[Path]: ...


class Sink:
    """`smtp-sink` on MX_V4 and MX_V6 port 25 in `lab.net`, dumping each transaction.

    One process per address (smtp-sink listens on one), not one on [::]:25: that would
    take port 25 of every address there, the slow receiver's and the tarpit's too.
    """

    def __init__(self, lab: Lab) -> None:
        self.dir = lab.tempdir("sink")
        self.dumps = self.dir / "dumps"
        self.dumps.mkdir()
        nobody = pwd.getpwnam("nobody")
        self._out = (self.dir / "smtp-sink.log").open("wb")
        lab.defer(self._out.close)
        self.procs = []
        for index, listen in enumerate((f"{MX_V4}:25", f"[{MX_V6}]:25")):
            dumps = self.dumps / str(index)
            dumps.mkdir()
            os.chown(dumps, nobody.pw_uid, nobody.pw_gid)
            argv = ["smtp-sink", "-u", "nobody", "-h", "mx.test", "-d", f"{dumps}/%s."]
            self.procs.append(
                lab.popen(lab.net, [*argv, listen, "1024"], stdout=self._out, stderr=self._out)
            )
        deadline = time.monotonic() + 10
        while not self._listening(lab):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                raise LabError(f"smtp-sink did not start: {self.log()}")
            time.sleep(0.02)

    @staticmethod
    def _listening(lab: Lab) -> bool:
        sockets = lab.run(lab.net, ["ss", "-Hltn"]).stdout
        return f"{MX_V4}:25 " in sockets and f"[{MX_V6}]:25 " in sockets

    def log(self) -> str:
        return (self.dir / "smtp-sink.log").read_text(errors="replace")

    def count(self) -> int:
        return sum(len(os.listdir(d)) for d in self.dumps.iterdir())

    def cpu(self) -> float:
        return sum(tree_cpu(p.pid) for p in self.procs)

    def dumped(self) -> list[Path]:
        return sorted(p for d in self.dumps.iterdir() for p in d.iterdir())


def wait_for(receiver: Receiver, count: int, timeout: float) -> tuple[float | None, float | None]:
    """Monotonic times at which the first dump and `count` dumps were there (None: not
    within `timeout`)."""
    deadline = time.monotonic() + timeout
    first = None
    while True:
        now = time.monotonic()
        seen = receiver.count()
        if first is None and seen:
            first = now
        if seen >= count:
            return first, now
        if now > deadline:
            return first, None
        time.sleep(_POLL)


@dataclass(frozen=True, slots=True)
class Arrival:
    """One dumped transaction: who connected, what it said, and which message it carried."""

    client: str
    helo: str
    mail: str
    name: str  # "<tag> <domain> <seq>" from the Subject, "" if there was none
    complete: bool  # the message's last line ("end <name>") is there
    at: float  # when the dump was last written (wall clock): the message's arrival


def parse_dump(dump: bytes, at: float) -> Arrival:
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
    return Arrival(client, fields.get("X-Helo-Args", ""), mail, name, complete, at)


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
    arrivals: Sequence[Arrival], expected: Collection[str], tenants: Sequence[TenantSpec]
) -> Check:
    by_domain = {t.domain: t for t in tenants}
    seen = Counter(a.name for a in arrivals)
    wrong = [w for a in arrivals if (w := _wrong(a, by_domain, expected))]
    families = Counter(
        f"ipv{ipaddress.ip_address(a.client).version}" for a in arrivals if _is_address(a.client)
    )
    return Check(
        received=len(arrivals),
        missing=len(set(expected) - seen.keys()),
        duplicates=sum(n - 1 for name, n in seen.items() if n > 1 and name in expected),
        wrong=tuple(wrong[:5]),
        wrong_count=len(wrong),
        families=dict(families),
    )


def _wrong(a: Arrival, tenants: dict[str, TenantSpec], expected: Collection[str]) -> str:
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


def collect(
    receiver: Receiver, expected: Collection[str], tenants: Sequence[TenantSpec]
) -> tuple[Check, list[Arrival]]:
    """Check, then clear, what `receiver` holds, once transactions in flight are written."""
    deadline = time.monotonic() + 5
    while True:
        paths = receiver.dumped()
        arrivals = [parse_dump(p.read_bytes(), p.stat().st_mtime) for p in paths]
        result = check(arrivals, expected, tenants)
        if result.ok or time.monotonic() > deadline:
            for path in paths:
                path.unlink()
            return result, arrivals
        time.sleep(0.1)
