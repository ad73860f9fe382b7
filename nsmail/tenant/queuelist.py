"""A queue as its owner reads it: its entries, and mailq(1)-style text of them for people.

`scan` and `load` read a tenant's queue files, as the queue's owner: `nsmail-sendmail -bp`
as the tenant's user, `nsmail queue` in a child that dropped to the owner's uid (see
`nsmail.commands.queue`). `format_listing` and `format_entry` show entries with times in
the host's local time zone, which is why they are not in `nsmail.core.queueplan`.

Security: queue files are tenant-written: they are opened without following symlinks
and without blocking (a FIFO), only regular files are read (`Spool.open_message`),
`queuefile` decoding raises only QueueFileError, and every tenant-written string is
escaped (`nsmail.core.text`) before it reaches a terminal.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence

from nsmail.core.layout import DEFERRED, STATES
from nsmail.core.queuefile import Envelope, QueueFileError
from nsmail.core.queueplan import Entry, deferrals
from nsmail.core.text import printable
from nsmail.tenant.spool import Spool

WIDTH = 79  # of `list`'s reason lines


def scan(spool: Spool, tenant: str) -> list[Entry]:
    """Every message in the queue, state by state, oldest first in each."""
    entries = []
    for state in STATES:
        for queue_id in spool.ids(state):
            loaded = load(spool, tenant, state, queue_id)
            if loaded is not None:
                entries.append(loaded[0])
    return entries


def load(
    spool: Spool, tenant: str, state: str, queue_id: str, keep: int = 0
) -> tuple[Entry, bytes] | None:
    """One queue file's entry and the first `keep` bytes of its message (none if it is
    unreadable); None if it is not there."""
    try:
        with spool.open_message(state, queue_id) as (envelope, body, mtime):
            next_attempt = mtime if state == DEFERRED else None
            entry = Entry(tenant, queue_id, state, body.length, envelope, next_attempt)
            return entry, body.read(0, keep)
    except FileNotFoundError:
        return None
    except OSError as e:
        return Entry(tenant, queue_id, state, 0, None, error=describe(e)), b""
    except QueueFileError as e:
        size = _size(spool, state, queue_id)
        return Entry(tenant, queue_id, state, size, None, None, str(e)), b""


def _size(spool: Spool, state: str, queue_id: str) -> int:
    try:
        return spool.path(state, queue_id).lstat().st_size
    except OSError:
        return 0


def format_listing(entries: Sequence[Entry]) -> str:
    """mailq(1)-style text: a block per message, grouped under its tenant, then a total."""
    if not entries:
        return "Mail queue is empty\n"
    header = f"{'-Queue ID-':<22} {'--Size--':>8} {'----Arrival Time----':<20} {'-State-':<8}"
    indent = " " * (len(header) + 1)
    blocks = [header + " -Sender/Recipient-------\n"]
    tenant = None
    for entry in entries:
        if entry.tenant != tenant:
            tenant = entry.tenant
            blocks.append(f"{printable(tenant)}:\n")
        env = entry.envelope
        arrival = "?" if env is None else _short_time(env.arrival)
        if env is None:
            sender = f"(unreadable: {printable(entry.error)})"
        else:
            sender = printable(env.sender) or "<>"
        lines = [f"{entry.queue_id:<22} {entry.size:>8} {arrival:<20} {entry.state:<8} {sender}"]
        if entry.next_attempt is not None and env is not None:
            when = _short_time(entry.next_attempt)
            tries = f"{env.attempts} attempt{'s' if env.attempts != 1 else ''}"
            lines.append(f"{indent}({tries}, next {when})")
        if env is not None and env.deferrals:
            lines.append(_reason_line(env))
        lines += [indent + printable(r) for r in (() if env is None else env.recipients)]
        if env is not None and env.extract and not env.cleaned:
            lines.append(indent + "(recipients from the headers, -t)")
        blocks.append("\n".join(lines) + "\n\n")
    total_kib = (sum(e.size for e in entries) + 1023) // 1024
    count = len(entries)
    blocks.append(f"-- {total_kib} Kbytes in {count} Request{'s' if count != 1 else ''}.\n")
    return "".join(blocks)


def _reason_line(envelope: Envelope) -> str:
    """postqueue -p's parenthesised line: why the message waits, one reason, cut short."""
    reasons = list(dict.fromkeys(d.reason for d in deferrals(envelope).values()))
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    reason = printable(reasons[0])
    room = WIDTH - len(more) - 2
    if len(reason) > room:
        reason = reason[: room - 3] + "..."
    return f"({reason}){more}"


def format_entry(entry: Entry) -> str:
    """`show`'s envelope part: one `Field: value` line each, like postcat's."""
    fields = [("Queue ID", entry.queue_id), ("Tenant", entry.tenant), ("State", entry.state)]
    fields.append(("Size", str(entry.size)))
    env = entry.envelope
    if env is None:
        fields.append(("Error", entry.error))
    else:
        fields += [("Arrival", _long_time(env.arrival)), ("Sender", f"<{env.sender}>")]
        waiting = deferrals(env)
        for address in env.recipients:
            fields.append(("Recipient", address))
            if address in waiting:
                fields.append(("Delay reason", waiting[address].reason))
        if env.extract and not env.cleaned:
            fields.append(("Recipients", "from the headers (-t), not yet read"))
        fields.append(("Attempts", str(env.attempts)))
        if waiting:
            fields.append(("Last attempt", _long_time(max(d.at for d in waiting.values()))))
        if env.warned:
            fields.append(("Delay notice", "sent"))
        fields += [(k, v) for k, v in (("Submitter", env.submitter), ("Name", env.full_name)) if v]
    if entry.next_attempt is not None:
        fields.append(("Next attempt", _long_time(entry.next_attempt)))
    return "".join(f"{name + ':':<14}{printable(value)}\n" for name, value in fields)


def _short_time(when: float) -> str:
    return _local_time("%a %b %e %H:%M:%S", when)


def _long_time(when: float) -> str:
    return _local_time("%Y-%m-%d %H:%M:%S %z", when)


def _local_time(layout: str, when: float) -> str:
    try:
        return time.strftime(layout, time.localtime(when))
    except (OverflowError, OSError, ValueError):  # a tenant-written arrival time
        return "?"


def describe(error: OSError) -> str:
    """An error reading or changing a queue file, in words."""
    if error.errno == errno.ELOOP:
        return "a symbolic link (not followed)"
    return error.strerror or str(error)
