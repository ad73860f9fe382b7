"""The queue tools' pure core: queued messages as entries, and the plans that change them.

`nsmail queue` (like Postfix's postqueue and postsuper) lists every tenant's queue and
moves messages between states. Here, without IO: an `Entry` per queue file and its JSON
(`postqueue -j`'s fields, then nsmail's own), and the changes a verb makes to the
messages it names or to all of them, planned from an index of which message is in which
state (`plan_named`, all or nothing; `plan_all`), with each refusal's exit status.
The IO is `nsmail.tenant.queuelist` (reading a queue) and `nsmail.commands.queue` (the
command, changing a queue as its owner).

Security: an entry's envelope is tenant-written; every string of it that reaches a
person goes through `nsmail.core.text.printable`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nsmail.core.addresses import split
from nsmail.core.exitcodes import (
    EX_CONFIG,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
)
from nsmail.core.layout import ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, MAILDROP
from nsmail.core.queuefile import Deferral, Envelope
from nsmail.core.text import printable

# When several things failed, the exit status names the one a retry cannot fix first.
_PRECEDENCE = (EX_USAGE, EX_NOPERM, EX_CONFIG, EX_SOFTWARE, EX_NOINPUT, EX_TEMPFAIL)

# States whose messages the worker is about to move: an operator's rename could race it.
IN_WORKERS_HANDS = {
    MAILDROP: "not yet taken in by the worker, try again",
    ACTIVE: "being delivered, try again",
}
_BLANK_LINE = re.compile(rb"(?:^|(?<=\n))\r?\n")


@dataclass(frozen=True, slots=True)
class Entry:
    """One queue file as listed."""

    tenant: str
    queue_id: str
    state: str
    size: int  # of the message; of the file when it does not decode
    envelope: Envelope | None  # None: damaged or unreadable, see `error`
    next_attempt: float | None = None  # deferred mail only: the file's mtime
    error: str = ""


def entry_json(entry: Entry) -> dict[str, Any]:
    """The JSON object of one message: `postqueue -j`'s fields, then nsmail's own."""
    env = entry.envelope
    return {
        "queue_name": entry.state,
        "queue_id": entry.queue_id,
        "arrival_time": None if env is None else int(env.arrival),
        "message_size": entry.size,
        "sender": None if env is None else env.sender,
        "recipients": [] if env is None else _recipients_json(env),
        "tenant": entry.tenant,
        "attempts": None if env is None else env.attempts,
        "next_attempt": None if entry.next_attempt is None else int(entry.next_attempt),
        "delay_warned": None if env is None else env.warned,
        "submitter": None if env is None else env.submitter,
        "recipients_from_headers": env is not None and env.extract and not env.cleaned,
        "error": entry.error or None,
    }


def _recipients_json(envelope: Envelope) -> list[dict[str, Any]]:
    """`postqueue -j`'s address and delay_reason per recipient, then nsmail's own fields."""
    waiting = deferrals(envelope)
    listed: list[dict[str, Any]] = []
    for address in envelope.recipients:
        deferral = waiting.get(address)
        if deferral is None:
            listed.append({"address": address})
            continue
        listed.append(
            {
                "address": address,
                "delay_reason": deferral.reason,
                "enhanced_status": deferral.status,
                "reply_code": deferral.code,
                "relay": deferral.relay or None,
                "last_attempt": int(deferral.at),
            }
        )
    return listed


def deferrals(envelope: Envelope) -> dict[str, Deferral]:
    """Why each recipient waits, by address (the first word, should a file say it twice)."""
    found: dict[str, Deferral] = {}
    for deferral in envelope.deferrals:
        found.setdefault(deferral.recipient, deferral)
    return found


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """The header section and the body (RFC 5322 2.1: an empty line separates them)."""
    blank = _BLANK_LINE.search(message)
    if blank is None:
        return message, b""
    return message[: blank.start()], message[blank.end() :]


@dataclass(frozen=True, slots=True)
class Verb:
    """A command that moves or removes messages."""

    name: str
    sources: tuple[str, ...]  # the states it takes messages from
    target: str | None  # None: the message is removed
    # With --all, is mail still in the worker's hands left undone (and so reported)?
    waits_for_worker: bool
    help: str


VERBS = {
    verb.name: verb
    for verb in (
        Verb("hold", (INCOMING, DEFERRED), HOLD, True, "keep messages from delivery"),
        Verb("release", (HOLD,), INCOMING, False, "let held messages go (delivered now)"),
        Verb("requeue", (DEFERRED, HOLD), INCOMING, False, "retry messages now"),
        Verb("delete", (INCOMING, DEFERRED, HOLD, CORRUPT), None, True, "remove messages"),
    )
}

Index = Mapping[str, Sequence[str]]  # queue id -> the states it is in, in one queue


@dataclass(frozen=True, slots=True)
class Change:
    """One message to move (or remove, with no target) in one queue."""

    tenant: str
    queue_id: str
    source: str
    target: str | None  # None: remove it; the source itself: nothing to do


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one message: done (code 0), or why not."""

    queue_id: str
    tenant: str | None = None
    source: str | None = None
    target: str | None = None
    code: int = EX_OK
    reason: str = ""


def plan_named(
    verb: Verb, indexes: Mapping[str, Index], ids: Iterable[str], *, own_queue_only: bool
) -> tuple[list[Change], list[Outcome]]:
    """The changes for named messages, and the refusals; any refusal means none is made.

    `indexes` maps each queue the caller may act on to where its messages are. A caller
    limited to its own queue cannot tell another queue's message from no message: both are
    not permitted.
    """
    changes: list[Change] = []
    refusals: list[Outcome] = []
    for queue_id in dict.fromkeys(ids):
        holders = [tenant for tenant, index in indexes.items() if queue_id in index]
        if not holders:
            refusals.append(missing(queue_id, own_queue_only))
        elif len(holders) > 1:
            where = ", ".join(holders)
            reason = f"is in the queues of {where}: name one with --tenant"
            refusals.append(Outcome(queue_id, code=EX_USAGE, reason=reason))
        else:
            _add(changes, refusals, _changes_for(verb, holders[0], queue_id, indexes[holders[0]]))
    return changes, refusals


def missing(queue_id: str, own_queue_only: bool) -> Outcome:
    if own_queue_only:
        return Outcome(queue_id, code=EX_NOPERM, reason="not in your queue")
    return Outcome(queue_id, code=EX_NOINPUT, reason="no such message")


def plan_all(verb: Verb, indexes: Mapping[str, Index]) -> tuple[list[Change], list[Outcome]]:
    """The changes `--all` makes, and the messages it must leave (reported, not blocking)."""
    changes: list[Change] = []
    refusals: list[Outcome] = []
    for tenant, index in indexes.items():
        for queue_id, states in index.items():
            busy = any(s in IN_WORKERS_HANDS for s in states)
            if any(s in verb.sources for s in states) or (busy and verb.waits_for_worker):
                _add(changes, refusals, _changes_for(verb, tenant, queue_id, index))
    return changes, refusals


def _add(changes: list[Change], refusals: list[Outcome], result: list[Change] | Outcome) -> None:
    if isinstance(result, Outcome):
        refusals.append(result)
    else:
        changes += result


def _changes_for(verb: Verb, tenant: str, queue_id: str, index: Index) -> list[Change] | Outcome:
    states = index[queue_id]
    busy = next((s for s in states if s in IN_WORKERS_HANDS), None)
    if busy is not None:
        return Outcome(queue_id, tenant, busy, code=EX_TEMPFAIL, reason=IN_WORKERS_HANDS[busy])
    if verb.target is None:
        return [Change(tenant, queue_id, state, None) for state in states]
    if len(states) > 1:  # a crash between two steps, or the tenant's doing
        where = ", ".join(f"{s}/" for s in states)
        reason = f"has copies in {where}: delete it instead"
        return Outcome(queue_id, tenant, code=EX_NOINPUT, reason=reason)
    (state,) = states
    if state != verb.target and state not in verb.sources:
        applies = ", ".join(f"{s}/" for s in verb.sources)
        reason = f"is in {state}/; {verb.name} applies to mail in {applies}"
        return Outcome(queue_id, tenant, state, code=EX_NOINPUT, reason=reason)
    return [Change(tenant, queue_id, state, verb.target)]


def worst(codes: Iterable[int]) -> int:
    """The exit status for several outcomes (see `_PRECEDENCE`)."""
    present = set(codes)
    return next((code for code in _PRECEDENCE if code in present), EX_OK)


def format_outcome(outcome: Outcome) -> str:
    where = (
        f"{outcome.queue_id} ({printable(outcome.tenant)})" if outcome.tenant else outcome.queue_id
    )
    if outcome.code != EX_OK:
        return f"{where}: {outcome.reason}"
    if outcome.target is None:
        return f"{where}: deleted from {outcome.source}/"
    if outcome.target == outcome.source:
        return f"{where}: already in {outcome.target}/"
    return f"{where}: {outcome.source}/ -> {outcome.target}/"


def outcome_json(verb: Verb, outcome: Outcome) -> dict[str, Any]:
    return {
        "action": verb.name,
        "queue_id": outcome.queue_id,
        "tenant": outcome.tenant,
        "from": outcome.source,
        "to": outcome.target,
        "code": outcome.code,
        "error": outcome.reason or None,
    }


# --- by destination (like Postfix's qshape) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class DestinationRow:
    """The queued mail of one tenant for one recipient domain."""

    tenant: str
    domain: str
    messages: int
    recipients: int
    oldest: float  # arrival of the oldest of its messages
    states: Mapping[str, int]  # messages per queue state
    reason: str  # why the latest attempt left a recipient waiting, "" if none did


def by_destination(entries: Iterable[Entry]) -> list[DestinationRow]:
    """Queued mail grouped by tenant and recipient domain, the most messages first."""
    groups: dict[tuple[str, str], list[tuple[Entry, list[str]]]] = {}
    for entry in entries:
        if entry.envelope is None:
            continue
        domains: dict[str, list[str]] = {}
        for recipient in entry.envelope.recipients:
            domains.setdefault(split(recipient)[1].lower(), []).append(recipient)
        for domain, recipients in domains.items():
            groups.setdefault((entry.tenant, domain), []).append((entry, recipients))
    rows = [_row(tenant, domain, found) for (tenant, domain), found in groups.items()]
    return sorted(rows, key=lambda r: (-r.messages, r.tenant, r.domain))


def _row(tenant: str, domain: str, found: list[tuple[Entry, list[str]]]) -> DestinationRow:
    states: dict[str, int] = {}
    latest: Deferral | None = None
    for entry, recipients in found:
        states[entry.state] = states.get(entry.state, 0) + 1
        assert entry.envelope is not None
        for recipient, why in deferrals(entry.envelope).items():
            if recipient in recipients and (latest is None or why.at > latest.at):
                latest = why
    return DestinationRow(
        tenant=tenant,
        domain=domain,
        messages=len(found),
        recipients=sum(len(r) for _, r in found),
        oldest=min(entry.envelope.arrival for entry, _ in found if entry.envelope),
        states=states,
        reason="" if latest is None else latest.reason,
    )


def destination_json(row: DestinationRow, now: float) -> dict[str, Any]:
    return {
        "tenant": row.tenant,
        "domain": row.domain,
        "messages": row.messages,
        "recipients": row.recipients,
        "oldest_age": max(0.0, now - row.oldest),
        "states": dict(row.states),
        "reason": row.reason,
    }


def format_by_destination(rows: Sequence[DestinationRow], now: float) -> str:
    """A table per tenant, a line per domain, and the last reason under it if there is one."""
    lines: list[str] = []
    for tenant in sorted({row.tenant for row in rows}):
        lines += [
            f"{printable(tenant)}:",
            f"  {'DOMAIN':<28} {'MSGS':>5} {'RCPTS':>5} {'OLDEST':>7}  STATES",
        ]
        for row in (r for r in rows if r.tenant == tenant):
            states = ", ".join(f"{n} {state}" for state, n in sorted(row.states.items()))
            lines.append(
                f"  {printable(row.domain)[:28]:<28} {row.messages:>5} {row.recipients:>5} "
                f"{_age(now - row.oldest):>7}  {states}"
            )
            if row.reason:
                lines.append(f"    ({printable(row.reason)[:73]})")
    return "".join(line + "\n" for line in lines)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
