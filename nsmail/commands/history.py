"""`nsmail log`: a tenant's delivery history, one line (or JSON object) per recipient and attempt.

Like cPanel's Track Delivery: root sees every tenant's history (and the host's own), a
tenant's user only its own tenant's, without access to the host's journal. `--since`
takes an ISO 8601 date or time (local time unless it says otherwise) or a span back
from now (`90s`, `30m`, `2h`, `7d`); `--to` keeps the events of one recipient address
(compared without regard to case). Exit status: 0, 64 usage (a bad --since, an unknown
tenant), 77 another tenant's history, 78 configuration, 75 a history that could not be
read (the others are still shown).

Security: run by root or by a tenant's user; not setuid. The histories are read as the
queues are by `nsmail queue`, through its `select_queues` and `in_queue`: with the
owner's rights only (root's reads happen in a child dropped to the tenant's uid), and
every event is decoded as hostile (`nsmail.core.events.decode`) and escaped before it
reaches a terminal.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from nsmail.commands.queue import QueueError, in_each_queue, select_queues
from nsmail.core import events
from nsmail.core.config import ConfigError
from nsmail.core.exitcodes import EX_CONFIG, EX_OK, EX_USAGE
from nsmail.core.queueplan import worst
from nsmail.core.text import printable
from nsmail.host import configfile
from nsmail.tenant.history import History
from nsmail.tenant.spool import Spool

_SPAN = re.compile(r"(\d{1,9})([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since(text: str, now: float) -> float:
    """The Unix time `--since TEXT` names; raises ValueError."""
    span = _SPAN.fullmatch(text)
    if span:
        return now - int(span.group(1)) * _UNIT[span.group(2)]
    when = datetime.fromisoformat(text)  # a naive one is local time: astimezone says so
    return when.astimezone().timestamp()


def main(
    config_path: Path,
    tenant: str | None,
    since_text: str | None,
    to: str | None,
    as_json: bool,
    uid: int,
) -> int:
    try:
        start = None if since_text is None else since(since_text, time.time())
    except ValueError:
        _complain(f"--since {printable(since_text or '')}: neither a date and time nor 30m, 2h...")
        return EX_USAGE
    try:
        queues = select_queues(configfile.load(config_path), uid, tenant)
    except QueueError as e:
        _complain(e.message)
        return e.code
    except ConfigError as e:
        _complain(str(e))
        return EX_CONFIG

    def work(spool: Spool, domain: str) -> tuple[Any, bytes]:
        kept = [
            events.to_json(e)
            for e in History(spool.root).read()
            if (start is None or e.time >= start)
            and (to is None or e.recipient.lower() == to.lower())
        ]
        return kept, b""

    shown, codes = in_each_queue(queues, uid, work, _complain)
    # Decoded again: the child that read them ran with the tenant's rights.
    found = [e for e in map(_event, (s for each in shown for s in each)) if e is not None]
    found.sort(key=lambda e: e.time)
    try:
        for event in found:
            sys.stdout.write(events.encode(event) if as_json else _line(event))
            sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`
        return EX_OK
    return worst(codes)


def _event(shown: object) -> events.Event | None:
    return events.decode(json.dumps(shown).encode())


def _line(event: events.Event) -> str:
    when = datetime.fromtimestamp(event.time).astimezone().strftime("%b %e %H:%M:%S")
    return f"{when} {events.text(event)}"


def _complain(message: str) -> None:
    print(f"nsmail log: {message}", file=sys.stderr, flush=True)
