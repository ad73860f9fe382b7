"""Status records (workers, the DNS relay, a refused reload) and their two renderings: JSON
for programs, a table for people (the time passed in)."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Record = TypeVar("_Record", bound="DataclassInstance")


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """What the supervisor knows about one worker (its own view and the worker's report)."""

    domain: str
    role: str  # "host" (the machine's own users' mail) or "tenant"
    namespace: str | None
    pid: int | None
    uid: int
    # starting, idle, delivering, backing off, asleep, silent, crashed, stopping, suspended
    state: str
    ipv4: str | None
    ipv6: str | None
    restarts: int
    started: float | None  # wall-clock time of the current worker's start
    queue: dict[str, int] | None  # messages per queue state, as last reported
    total: dict[str, int] | None  # sent / deferred / bounced since the worker started
    hour: dict[str, int] | None  # the same, in the last hour
    last_error: str | None  # the latest of a delivery error and a crash
    last_error_at: float | None
    last_delivery_at: float | None
    refused_reports: int  # status reports refused as malformed or lying
    latency_counts: list[int] | None  # delivered recipients per nsmail.core.report latency bucket
    latency_sum: float | None
    sessions: int | None = None  # SMTP sessions open
    # Destinations held back: [{"name", "state" (throttled, dead), "until"}], a few at most.
    destinations: list[dict[str, Any]] | None = None
    # Sessions each TLS policy failed (verified, dane, mta-sts, mta-sts-testing).
    tls_failures: dict[str, int] | None = None
    double_bounces: int | None = None  # bounces nobody took, told to the host's postmaster
    suspended: str | None = None  # why the automatic brake holds its mail (state "suspended")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> WorkerStatus:
        return _from_json(cls, record)


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """The DNS relay as the supervisor sees it."""

    pid: int | None
    state: str  # starting, running, restarting, stopping
    started: float | None  # wall-clock time of the current relay's start
    restarts: int
    last_error: str | None  # why the last one ended: it died, or did not answer a ping
    last_error_at: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RelayStatus:
        return _from_json(cls, record)


@dataclass(frozen=True, slots=True)
class ReloadRefusal:
    """The last reload the supervisor refused (it runs the configuration it had)."""

    error: str
    at: float  # wall clock

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ReloadRefusal:
        return _from_json(cls, record)


def _from_json(cls: type[_Record], record: dict[str, Any]) -> _Record:
    """A record from its JSON object; a field it lacks (an older supervisor's) is None."""
    return cls(**{field.name: record.get(field.name) for field in fields(cls)})


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


def render_table(
    records: list[WorkerStatus],
    now: float,
    relay: RelayStatus | None = None,
    refusal: ReloadRefusal | None = None,
) -> str:
    """Two lines per worker (more for kept mail and errors), then the DNS relay's, within
    80 columns, and a refused reload under the header; uptimes and ages as of `now` (wall
    clock). Long names are cut, not wrapped; the refusal is wrapped."""
    head = (
        f"{'DOMAIN':<20} {'ADDRESS':<19} {'PID':>7} {'STATE':<11} {'UP':>6} {'RST':>3} "
        f"{'QUEUED':>6}"
    )
    lines = [head]
    if refusal is not None:
        ago = _uptime(refusal.at, now)
        lines.append(_cut(f"! reload refused {ago} ago, the old configuration runs:", 79))
        lines += ["  " + line for line in textwrap.wrap(refusal.error, 77, max_lines=3)]
    for r in records:
        address = r.ipv4 or r.ipv6 or ("(host's own)" if r.role == "host" else "-")
        if r.ipv4 and r.ipv6:
            address += " +v6"
        queue = r.queue or {}
        waiting = sum(n for state, n in queue.items() if state not in ("hold", "corrupt"))
        lines.append(
            f"{_cut(r.domain, 20):<20} {_cut(address, 19):<19} {r.pid or '-':>7} "
            f"{_cut(r.state, 11):<11} {_uptime(r.started, now):>6} {r.restarts:>3} "
            f"{waiting if r.queue is not None else '-':>6}"
        )
        hour = r.hour or {}
        details = (
            f"  uid {r.uid}  ns {r.namespace or '-'}  last hour: {hour.get('sent', 0)} sent "
            f"{hour.get('deferred', 0)} deferred {hour.get('bounced', 0)} bounced"
        )
        if r.sessions:
            details += f"  {r.sessions} sessions"
        lines.append(_cut(details, 79))
        for held_back in r.destinations or ():
            until = held_back.get("until")
            left = f" for {_uptime(now, until)}" if isinstance(until, int | float) else ""
            lines.append(_cut(f"  {held_back['state']}{left}: {held_back['name']}", 79))
        failed = [f"{policy} {n}" for policy, n in (r.tls_failures or {}).items() if n]
        if failed:
            lines.append(_cut("  TLS policy failures: " + ", ".join(failed), 79))
        # Held mail waits for an operator; quarantined files (corrupt/) will never go.
        kept = [f"{queue[s]} {label}" for s, label in _KEPT if queue.get(s)]
        if r.double_bounces:
            kept.append(f"{r.double_bounces} double bounces (told the postmaster)")
        if kept:
            lines.append("  " + ", ".join(kept))
        if r.suspended:
            lines += [f"  {line}" for line in textwrap.wrap(f"suspended: {r.suspended}", 77)]
            lines.append(f"  (its mail is held: nsmail tenant resume {r.domain})")
        if r.last_error:
            lines.append(f"  last error: {_cut(r.last_error, 66)}")
    if relay is not None:
        lines.append(
            f"{'(dns relay)':<20} {'-':<19} {relay.pid or '-':>7} {_cut(relay.state, 11):<11} "
            f"{_uptime(relay.started, now):>6} {relay.restarts:>3}"
        )
        if relay.last_error:
            lines.append(f"  last error: {_cut(relay.last_error, 66)}")
    return "\n".join(lines)


_KEPT = (("hold", "held"), ("corrupt", "quarantined (corrupt/)"))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"
