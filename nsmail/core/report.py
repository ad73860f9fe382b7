"""Worker status reports: what a worker tells the supervisor, in a small, strict format.

A report is one JSON object in one datagram of at most MAX_REPORT bytes, with exactly the
fields of `Report`. The supervisor decodes it with `decode`, which refuses anything else:
oversized, malformed, a field missing, added or of the wrong type, a number out of range
(a time past MAX_TIME too), or a report claiming to be another tenant's. Pure: no IO, time
is passed in.

Security: the worker runs as the tenant and may be the tenant's (a compromised worker
can send anything); `decode` runs as root in the supervisor and must stay small, bounded
and exception-safe (only ReportError).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from nsmail.core.records import fields_of
from nsmail.core.tlspolicy import DEMANDING

MAX_REPORT = 4096
MAX_TEXT = 300
MAX_DESTINATIONS = 4  # dead or throttled destinations a report names (the first ones)
MAX_NAME = 120  # characters of a destination's name in a report
DESTINATION_STATES = ("throttled", "dead")
QUEUE_STATES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
# "asleep": the worker's last report before it exits for want of work (worker.idle_exit).
WORKER_STATES = ("idle", "delivering", "backing off", "asleep")
OUTCOMES = ("sent", "deferred", "bounced")
TLS_POLICIES = tuple(str(p) for p in DEMANDING)  # failures are counted per each
# Upper bounds (seconds) of the delivery latency histogram: arrival to delivery.
LATENCY_BOUNDS = (1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0)
_MAX_COUNT = 2**53
# 9999-12-31 23:59:59 UTC, the last second `datetime` can show: no report speaks of later.
# The supervisor still bounds its own waits (a time this far is years past epoll's limit).
MAX_TIME = 253402300799.0


class ReportError(ValueError):
    """The datagram is not a valid report for this worker."""


@dataclass(frozen=True, slots=True)
class Destination:
    """A destination the worker holds mail back from, and until when."""

    name: str  # its mail hosts, as the scheduler names it
    state: str  # one of DESTINATION_STATES
    until: float | None


@dataclass(frozen=True, slots=True)
class Report:
    domain: str
    state: str  # one of WORKER_STATES
    queue: Mapping[str, int]  # messages per queue state
    total: Mapping[str, int]  # outcomes since the worker started, per OUTCOMES
    hour: Mapping[str, int]  # outcomes in the last hour
    last_error: str | None
    last_error_at: float | None
    last_delivery_at: float | None
    next_due: float | None  # the earliest next attempt of a deferred message, if any
    taken: int  # messages taken in within the last hour (toward hourly_limit)
    # Delivered recipients by latency: counts per LATENCY_BOUNDS bucket (+ one for more),
    # not cumulative, and the sum of all latencies.
    latency_counts: tuple[int, ...]
    latency_sum: float
    sessions: int = 0  # SMTP sessions open
    destinations: tuple[Destination, ...] = ()  # at most MAX_DESTINATIONS
    # Sessions each TLS policy failed to have as it demands, since the worker started.
    tls_failures: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(TLS_POLICIES, 0))
    # Bounces that found no one to take them, told to the host's postmaster instead.
    double_bounces: int = 0  # since the worker started


def encode(report: Report) -> bytes:
    """The report as one datagram; `last_error` is cut short if that is what it takes.

    Escaped as JSON, a character of `last_error` costs up to 12 bytes (a surrogate pair), so
    MAX_TEXT characters of remote reply text may not fit; everything else always does.
    """
    data = _json(report)
    excess = len(data) - MAX_REPORT
    if excess > 0 and report.last_error:
        text = report.last_error
        while excess > 0 and text:
            excess -= len(json.dumps(text[-1], ensure_ascii=True)) - 2  # less its quotes
            text = text[:-1]
        data = _json(replace(report, last_error=text))
    if len(data) > MAX_REPORT:
        raise ReportError("report too large")
    return data


def _json(report: Report) -> bytes:
    return json.dumps(asdict(report), separators=(",", ":"), ensure_ascii=True).encode()


def decode(data: bytes, domain: str) -> Report:
    """The report in `data` from the worker of `domain`; ReportError if it is not one."""
    fields = fields_of(data, MAX_REPORT, Report, ReportError)
    if fields["domain"] != domain:
        raise ReportError(f"claims to be {str(fields['domain'])[:100]!r}")
    if fields["state"] not in WORKER_STATES:
        raise ReportError("unknown state")
    return Report(
        domain=domain,
        state=fields["state"],
        queue=_counts(fields["queue"], QUEUE_STATES),
        total=_counts(fields["total"], OUTCOMES),
        hour=_counts(fields["hour"], OUTCOMES),
        last_error=_text(fields["last_error"]),
        last_error_at=_time(fields["last_error_at"]),
        last_delivery_at=_time(fields["last_delivery_at"]),
        next_due=_time(fields["next_due"]),
        taken=_count(fields["taken"]),
        latency_counts=_buckets(fields["latency_counts"]),
        latency_sum=_sum(fields["latency_sum"]),
        sessions=_count(fields["sessions"]),
        destinations=_destinations(fields["destinations"]),
        tls_failures=_counts(fields["tls_failures"], TLS_POLICIES),
        double_bounces=_count(fields["double_bounces"]),
    )


def _destinations(value: Any) -> tuple[Destination, ...]:
    if not isinstance(value, list) or len(value) > MAX_DESTINATIONS:
        raise ReportError("destinations of the wrong shape")
    found = []
    for item in value:
        if not isinstance(item, dict) or set(item) != set(Destination.__dataclass_fields__):
            raise ReportError("destinations of the wrong shape")
        name = _text(item["name"])
        if not name or len(name) > MAX_NAME or item["state"] not in DESTINATION_STATES:
            raise ReportError("bad destination")
        found.append(Destination(name, item["state"], _time(item["until"])))
    return tuple(found)


def _buckets(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != len(LATENCY_BOUNDS) + 1:
        raise ReportError("latency buckets of the wrong shape")
    if not all(type(n) is int and 0 <= n < _MAX_COUNT for n in value):
        raise ReportError("count out of range")
    return tuple(value)


def _counts(value: Any, keys: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(value, dict) or set(value) != set(keys):
        raise ReportError("counts of the wrong shape")
    return {key: _count(value[key]) for key in keys}


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value < _MAX_COUNT:
        raise ReportError("count out of range")
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or not value.isprintable():
        raise ReportError("bad text")
    return value


def _time(value: Any) -> float | None:
    """A time stamp, None for none."""
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value <= MAX_TIME:  # NaN fails it too
        raise ReportError("bad time")
    return float(value)


def _sum(value: Any) -> float:
    """A sum of durations: any finite number of seconds."""
    if type(value) not in (int, float) or not 0 <= value < math.inf:
        raise ReportError("bad sum")
    return float(value)


@dataclass
class Tally:
    """Outcome counters since start and over the last hour (per-minute buckets)."""

    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0
    _minutes: dict[int, dict[str, int]] = field(default_factory=dict)

    def observe_latency(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.latency_counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds

    def add(self, outcome: str, now: float) -> None:
        self.total[outcome] += 1
        bucket = self._minutes.setdefault(int(now // 60), dict.fromkeys(OUTCOMES, 0))
        bucket[outcome] += 1

    def last_hour(self, now: float) -> dict[str, int]:
        current = int(now // 60)
        for minute in [m for m in self._minutes if m <= current - 60]:
            del self._minutes[minute]
        hour = dict.fromkeys(OUTCOMES, 0)
        for bucket in self._minutes.values():
            for outcome, count in bucket.items():
                hour[outcome] += count
        return hour
