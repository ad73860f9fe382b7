"""Delivery events: one per recipient and attempt, as a log line and as a JSON object.

The worker makes one `Event` where it settles an attempt (`nsmail.tenant.qmgr`); it is
logged as Postfix's smtp(8) line (`text`) or, with `[log] format = "json"`, as one JSON
object (`encode`), and kept in the tenant's history (`nsmail.tenant.history`), which
`nsmail log` reads back (`decode`).

Security: pure. `decode` reads what a tenant can write (its history lives in its own
spool): it returns None for anything that is not an event as `encode` writes it, bounds
every string, and never raises; whoever prints a field escapes it (`core.text.printable`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nsmail.core.text import printable

MAX_FIELD = 1000  # characters of any one string (a reply is bounded well below this)
MAX_LINE = 8192  # bytes of one encoded event, newline included: longer lines are not events
STATUSES = frozenset({"sent", "deferred", "bounced"})  # core.outcome.Status's values


@dataclass(frozen=True, slots=True)
class Event:
    """What one attempt came to for one recipient. `delays` splits the time as Postfix's
    delays=a/b/c/d: in the queue before this attempt, waiting for a session (routing
    included), opening it, transferring."""

    time: float  # when the attempt was settled (Unix time)
    tenant: str
    queue_id: str
    sender: str  # "" for the null sender
    recipient: str
    relay: str  # host[address]:port, "local", or "none"
    delay: float  # seconds since the message arrived
    delays: tuple[float, float, float, float]
    dsn: str  # RFC 3463 enhanced status code
    status: str  # sent, deferred or bounced
    reply: str  # what the server replied, or nsmail's own words
    # The TLS policy that applied and what came of it (nsmail.core.tlspolicy); "" where no
    # session was tried.
    tls: str = ""


def text(event: Event) -> str:
    """The log line, like Postfix's: every tenant-given string escaped."""
    a, b, c, d = event.delays
    tls = f" tls={printable(event.tls)}" if event.tls else ""
    return (
        f"{event.queue_id}: tenant={event.tenant} from=<{printable(event.sender)}>"
        f" to=<{printable(event.recipient)}> relay={printable(event.relay)}"
        f"{tls} delay={event.delay:.1f} delays={a:.2g}/{b:.2g}/{c:.2g}/{d:.2g}"
        f" dsn={printable(event.dsn)} status={event.status} ({printable(event.reply)})"
    )


def to_json(event: Event) -> dict[str, Any]:
    """The event as a JSON object; `time` in ISO 8601, UTC, to the millisecond."""
    when = datetime.fromtimestamp(event.time, UTC).isoformat(timespec="milliseconds")
    return {
        "time": when,
        "tenant": event.tenant,
        "queue_id": event.queue_id,
        "sender": event.sender,
        "recipient": event.recipient,
        "relay": event.relay,
        "delay": round(event.delay, 3),
        "delays": [round(x, 3) for x in event.delays],
        "dsn": event.dsn,
        "status": event.status,
        "reply": event.reply,
        "tls": event.tls,
    }


def encode(event: Event) -> str:
    """One line of JSON (no newline), at most MAX_LINE - 1 bytes: strings are cut to
    MAX_FIELD characters first, and non-ASCII is escaped."""
    fields = to_json(event)
    for key, value in fields.items():
        if isinstance(value, str):
            fields[key] = value[:MAX_FIELD]
    return json.dumps(fields, separators=(",", ":"))


_STRINGS = (
    "tenant",
    "queue_id",
    "sender",
    "recipient",
    "relay",
    "dsn",
    "status",
    "reply",
    "tls",
)


def decode(line: bytes) -> Event | None:
    """The event `encode` wrote on `line`, or None for anything else (hostile input)."""
    if len(line) > MAX_LINE:
        return None
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(fields, dict):
        return None
    fields.setdefault("tls", "")  # an event from before TLS policies were recorded
    strings = [v for v in map(fields.get, _STRINGS) if isinstance(v, str) and len(v) <= MAX_FIELD]
    delays, delay = fields.get("delays"), fields.get("delay")
    if len(strings) != len(_STRINGS) or not isinstance(delay, int | float) or not _seconds(delay):
        return None
    if not (isinstance(delays, list) and len(delays) == 4 and all(map(_seconds, delays))):
        return None
    when = _instant(fields.get("time"))
    tenant, queue_id, sender, recipient, relay, dsn, status, reply, tls = strings
    if when is None or status not in STATUSES:
        return None
    return Event(
        time=when,
        tenant=tenant,
        queue_id=queue_id,
        sender=sender,
        recipient=recipient,
        relay=relay,
        delay=float(delay),
        delays=(float(delays[0]), float(delays[1]), float(delays[2]), float(delays[3])),
        dsn=dsn,
        status=status,
        reply=reply,
        tls=tls,
    )


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _instant(value: object) -> float | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None
