"""Worker status records and their two renderings: JSON for programs, a table for people."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """What the supervisor knows about one tenant's worker."""

    domain: str
    role: str  # "host" (the machine's own users' mail) or "tenant"
    namespace: str | None
    pid: int | None
    uid: int
    state: str
    ipv4: str | None
    ipv6: str | None
    restarts: int
    started: float | None  # wall-clock time of the current worker's start
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> WorkerStatus:
        fields: dict[str, Any] = {name: record.get(name) for name in cls.__dataclass_fields__}
        return cls(**fields)


def _uptime(started: float | None, now: float) -> str:
    if started is None:
        return "-"
    seconds = int(max(0.0, now - started))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def render_table(records: list[WorkerStatus], now: float | None = None) -> str:
    """A table that fits 80 columns; long domains and addresses are cut, not wrapped."""
    now = time.time() if now is None else now
    head = f"{'DOMAIN':<20} {'ADDRESS':<19} {'PID':>7} {'UID':>7} {'STATE':<9} {'UP':>6} {'RST':>4}"
    lines = [head]
    for r in records:
        address = r.ipv4 or r.ipv6 or ("(host's own)" if r.role == "host" else "-")
        if r.ipv4 and r.ipv6:
            address += " +v6"
        lines.append(
            f"{_cut(r.domain, 20):<20} {_cut(address, 19):<19} {r.pid or '-':>7} {r.uid:>7} "
            f"{_cut(r.state, 9):<9} {_uptime(r.started, now):>6} {r.restarts:>4}"
        )
        if r.last_error:
            lines.append(f"  last error: {_cut(r.last_error, 64)}")
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"
