"""`nsmail queue`: list, show, hold, release, requeue, delete and flush a tenant's queued mail.

Like Postfix's postqueue and postsuper, for every tenant's queue (and the host's own, named by
`[host] name`). Commands and what they change:

- `list [--json]` and `show ID [--body] [--json]`: read only. `--json` prints JSON Lines like
  `postqueue -j`: one object per message (or per outcome), so output streams and greps.
  Deferred mail says why it waits: the last reply or error, per recipient (`delay_reason`);
  `list` shows one such reason per message, `show` each recipient's.
- `hold` (incoming, deferred -> hold), `release` (hold -> incoming), `requeue` (deferred,
  hold -> incoming: retry now) and `delete` (incoming, deferred, hold, corrupt: removed, never
  sent), each on the named IDs or `--all` of the selected queues. Mail in maildrop/ or active/
  is in the worker's hands and is never touched.
- `flush`: ask the worker to retry deferred mail now (like `nsmail flush`).

Named IDs are all or nothing: every ID is looked up first, and if any is unknown, not in a
state the command applies to, or in the worker's hands, nothing changes. `--all` changes
what it can and reports the rest (hold and delete: mail still in the worker's hands, 75).
Exit status (sysexits; when several apply, the first of this list): 64 usage (also an ID
found in two queues: name one with --tenant), 77 not permitted, 78 configuration, 70
internal error, 66 no such message or not in a state the command applies to, 75 try again
(in the worker's hands, moved meanwhile, or the queue could not be read); else 0.

Security: run by root or by a tenant's user (found by real uid, as sendmail does); not
setuid. Root never touches a queue itself: each queue is read and changed in a child that
dropped to the queue owner's uid and gid for good (`jail.run_as`), so a planted symlink
leads only where the tenant could go anyway. Its reply (JSON, then raw message bytes) comes
back through a memfd; after the uid change the child is not dumpable (fs.suid_dumpable = 0),
so the tenant cannot tamper with it, and a forged reply could only misreport that tenant's
own queue: changes are made by a child of the queue they name. A tenant's user sees and
changes only its own queue: `--tenant` or an ID of any other queue is refused (77) without
saying whether it exists, as its spool is not readable anyway. Queue files are
tenant-written: they are opened without following symlinks and without blocking (a FIFO),
only regular files are read, `queuefile.decode` raises only QueueFileError, and every
tenant-written string is escaped before it reaches a terminal. State changes are single
renames or unlinks of names checked with `valid_queue_id`; one that loses a race with the
worker reports it instead of guessing.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from nsmail.core import config as configuration
from nsmail.core.config import Config, Tenant, host_identity
from nsmail.core.headers import MAX_HEADER_BYTES
from nsmail.core.queuefile import Deferral, Envelope, QueueFileError, envelope_of, valid_queue_id
from nsmail.root.jail import run_as
from nsmail.tenant.spool import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    HOLD,
    INCOMING,
    MAILDROP,
    STATES,
    Spool,
)

PROG = "nsmail queue"
MAX_SHOWN = 256 << 20  # `show --body` reads the message into memory up to this size
WIDTH = 79  # of `list`'s reason lines
EX_OK = os.EX_OK
EX_USAGE = os.EX_USAGE
EX_NOINPUT = os.EX_NOINPUT  # no such message, or none in a state the command applies to
EX_SOFTWARE = os.EX_SOFTWARE
EX_TEMPFAIL = os.EX_TEMPFAIL
EX_NOPERM = os.EX_NOPERM
EX_CONFIG = os.EX_CONFIG
# When several things failed, the exit status names the one a retry cannot fix first.
_PRECEDENCE = (EX_USAGE, EX_NOPERM, EX_CONFIG, EX_SOFTWARE, EX_NOINPUT, EX_TEMPFAIL)

# States whose messages the worker is about to move: an operator's rename could race it.
_IN_WORKERS_HANDS = {
    MAILDROP: "not yet taken in by the worker, try again",
    ACTIVE: "being delivered, try again",
}
_BLANK_LINE = re.compile(rb"(?:^|(?<=\n))\r?\n")


class QueueError(Exception):
    """A refusal: the exit status and the one line that explains it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- pure core: queue entries ----------------------------------------------------------


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
    deferrals = _deferrals(envelope)
    listed: list[dict[str, Any]] = []
    for address in envelope.recipients:
        deferral = deferrals.get(address)
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


def _deferrals(envelope: Envelope) -> dict[str, Deferral]:
    """Why each recipient waits, by address (the first word, should a file say it twice)."""
    found: dict[str, Deferral] = {}
    for deferral in envelope.deferrals:
        found.setdefault(deferral.recipient, deferral)
    return found


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
    reasons = list(dict.fromkeys(d.reason for d in _deferrals(envelope).values()))
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
        deferrals = _deferrals(env)
        for address in env.recipients:
            fields.append(("Recipient", address))
            if address in deferrals:
                fields.append(("Delay reason", deferrals[address].reason))
        if env.extract and not env.cleaned:
            fields.append(("Recipients", "from the headers (-t), not yet read"))
        fields.append(("Attempts", str(env.attempts)))
        if deferrals:
            fields.append(("Last attempt", _long_time(max(d.at for d in deferrals.values()))))
        if env.warned:
            fields.append(("Delay notice", "sent"))
        fields += [(k, v) for k, v in (("Submitter", env.submitter), ("Name", env.full_name)) if v]
    if entry.next_attempt is not None:
        fields.append(("Next attempt", _long_time(entry.next_attempt)))
    return "".join(f"{name + ':':<14}{printable(value)}\n" for name, value in fields)


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """The header section and the body (RFC 5322 2.1: an empty line separates them)."""
    blank = _BLANK_LINE.search(message)
    if blank is None:
        return message, b""
    return message[: blank.start()], message[blank.end() :]


def printable_text(data: bytes) -> str:
    """Tenant-written message bytes for a terminal: line by line, control characters escaped."""
    lines = data.decode("utf-8", "replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    return "".join(printable(line.removesuffix("\r"), keep="\t") + "\n" for line in lines)


def printable(text: str, keep: str = "") -> str:
    """`text` safe for one line of a terminal: unprintable characters escaped."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def _short_time(when: float) -> str:
    return _local_time("%a %b %e %H:%M:%S", when)


def _long_time(when: float) -> str:
    return _local_time("%Y-%m-%d %H:%M:%S %z", when)


def _local_time(layout: str, when: float) -> str:
    try:
        return time.strftime(layout, time.localtime(when))
    except (OverflowError, OSError, ValueError):  # a tenant-written arrival time
        return "?"


# --- pure core: planning changes -------------------------------------------------------


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
            refusals.append(_missing(queue_id, own_queue_only))
        elif len(holders) > 1:
            where = ", ".join(holders)
            reason = f"is in the queues of {where}: name one with --tenant"
            refusals.append(Outcome(queue_id, code=EX_USAGE, reason=reason))
        else:
            _add(changes, refusals, _changes_for(verb, holders[0], queue_id, indexes[holders[0]]))
    return changes, refusals


def _missing(queue_id: str, own_queue_only: bool) -> Outcome:
    if own_queue_only:
        return Outcome(queue_id, code=EX_NOPERM, reason="not in your queue")
    return Outcome(queue_id, code=EX_NOINPUT, reason="no such message")


def plan_all(verb: Verb, indexes: Mapping[str, Index]) -> tuple[list[Change], list[Outcome]]:
    """The changes `--all` makes, and the messages it must leave (reported, not blocking)."""
    changes: list[Change] = []
    refusals: list[Outcome] = []
    for tenant, index in indexes.items():
        for queue_id, states in index.items():
            busy = any(s in _IN_WORKERS_HANDS for s in states)
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
    busy = next((s for s in states if s in _IN_WORKERS_HANDS), None)
    if busy is not None:
        return Outcome(queue_id, tenant, busy, code=EX_TEMPFAIL, reason=_IN_WORKERS_HANDS[busy])
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


# --- in a queue, with its owner's rights -----------------------------------------------


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
        return Entry(tenant, queue_id, state, 0, None, error=_os_error(e)), b""
    except QueueFileError as e:
        size = _size(spool, state, queue_id)
        return Entry(tenant, queue_id, state, size, None, None, str(e)), b""


def _size(spool: Spool, state: str, queue_id: str) -> int:
    try:
        return spool.path(state, queue_id).lstat().st_size
    except OSError:
        return 0


def index(spool: Spool, wanted: Collection[str] | None) -> dict[str, list[str]]:
    """The states each message is in: all of them, or the `wanted` ones."""
    found: dict[str, list[str]] = {}
    for state in STATES:
        for queue_id in spool.ids(state):
            if wanted is None or queue_id in wanted:
                found.setdefault(queue_id, []).append(state)
    return found


def apply(spool: Spool, change: Change) -> Outcome:
    """Make one change by one rename or unlink; a lost race with the worker is reported."""
    done = Outcome(change.queue_id, change.tenant, change.source, change.target)
    try:
        if change.target is None:
            spool.remove(change.source, change.queue_id)
        elif change.target != change.source:
            # rename(2) replaces its target: never let it drop another copy.
            if os.path.lexists(spool.path(change.target, change.queue_id)):
                return dataclasses.replace(
                    done, code=EX_TEMPFAIL, reason=f"appeared in {change.target}/, try again"
                )
            spool.move(change.queue_id, change.source, change.target)
    except FileNotFoundError:
        now = index(spool, {change.queue_id}).get(change.queue_id)
        if not now:
            reason = "no longer in the queue (delivered or removed meanwhile)"
            return dataclasses.replace(done, target=None, code=EX_NOINPUT, reason=reason)
        reason = _IN_WORKERS_HANDS.get(now[0], f"moved to {now[0]}/ meanwhile, try again")
        return dataclasses.replace(done, source=now[0], code=EX_TEMPFAIL, reason=reason)
    except OSError as e:
        return dataclasses.replace(done, code=EX_TEMPFAIL, reason=_os_error(e))
    return done


def _os_error(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "a symbolic link (not followed)"
    return error.strerror or str(error)


# --- running in a queue: as its owner, from root or as the caller ----------------------

Work = Callable[[Spool, str], tuple[Any, bytes]]  # (spool, tenant) -> (JSON value, raw bytes)


def in_queue(queue: Tenant, caller_uid: int, work: Work) -> tuple[Any, bytes]:
    """Run `work` on `queue` with its owner's rights: its JSON value and raw bytes.

    Root forks a child that drops to the owner (`run_as`); the owner itself works in this
    process. Either way the result crosses the same JSON framing, so both take one path.
    Raises QueueError(EX_TEMPFAIL) if the queue could not be read or changed.
    """
    reply = _as_owner(queue, work) if caller_uid == 0 else _framed(work, queue)
    head, _, payload = reply.partition(b"\n")
    result = json.loads(head)
    if "error" in result:
        raise QueueError(EX_TEMPFAIL, f"{queue.domain}: {result['error']}")
    return result["ok"], payload


def _as_owner(queue: Tenant, work: Work) -> bytes:
    # A memfd, not a pipe: the child may write more than a pipe holds before run_as reaps it.
    fd = os.memfd_create("nsmail-queue", os.MFD_CLOEXEC)
    try:
        code = run_as(queue.uid, queue.gid, lambda: _write_all(fd, _framed(work, queue)))
        if code != 0:
            raise QueueError(
                EX_SOFTWARE, f"{queue.domain}: the helper as uid {queue.uid} failed ({code})"
            )
        with open(fd, "rb", closefd=False) as reply:
            reply.seek(0)
            return reply.read()
    finally:
        os.close(fd)


def _framed(work: Work, queue: Tenant) -> bytes:
    """One JSON line, {"ok": value} or {"error": why}, then the raw bytes."""
    try:
        value, payload = work(Spool(queue.spool), queue.domain)
        head: dict[str, Any] = {"ok": value}
    except OSError as e:
        where = f" ({printable(str(e.filename))})" if e.filename else ""
        head, payload = {"error": _os_error(e) + where}, b""
    return json.dumps(head).encode("ascii") + b"\n" + payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _entry_to_wire(entry: Entry) -> dict[str, Any]:
    return dataclasses.asdict(entry)  # the envelope too, as a nested object


def _entry_from_wire(wire: dict[str, Any]) -> Entry:
    envelope = wire["envelope"]
    return Entry(**{**wire, "envelope": None if envelope is None else envelope_of(envelope)})


# --- commands --------------------------------------------------------------------------


def select_queues(config: Config, caller_uid: int, wanted: str | None) -> list[Tenant]:
    """The queues the caller may act on: root any (all by default), a tenant's user its own."""
    every = [*config.tenants, host_identity(config)]
    if caller_uid == 0:
        if wanted is None:
            return every
        named = [q for q in every if q.domain == wanted.lower()]
        if not named:
            raise QueueError(EX_USAGE, f"no such tenant: {printable(wanted)}")
        return named
    mine = next((q for q in every if q.uid == caller_uid), None)
    if mine is None:
        raise QueueError(EX_NOPERM, f"uid {caller_uid} is neither root nor a tenant's user")
    if wanted is not None and wanted.lower() != mine.domain:
        raise QueueError(EX_NOPERM, f"you may act only on the queue of {mine.domain}")
    return [mine]


def _list(queues: Sequence[Tenant], uid: int, as_json: bool) -> int:
    def work(spool: Spool, tenant: str) -> tuple[Any, bytes]:
        return [_entry_to_wire(e) for e in scan(spool, tenant)], b""

    entries: list[Entry] = []
    codes = []
    for queue in queues:  # one unreadable queue does not hide the others
        try:
            wires, _ = in_queue(queue, uid, work)
        except QueueError as e:
            _complain(e.message)
            codes.append(e.code)
            continue
        entries += [_entry_from_wire(w) for w in wires]
    if as_json:
        _out("".join(json.dumps(entry_json(e)) + "\n" for e in entries))
    else:
        _out(format_listing(entries))
    return worst(codes)


def _show(queues: Sequence[Tenant], uid: int, queue_id: str, body: bool, as_json: bool) -> int:
    def work(spool: Spool, tenant: str) -> tuple[Any, bytes]:
        # A message the worker moves on can slip past one pass over the states.
        for _ in range(3):
            for state in STATES:
                keep = MAX_SHOWN if body else MAX_HEADER_BYTES
                loaded = load(spool, tenant, state, queue_id, keep)
                if loaded is not None:
                    entry, message = loaded
                    return _entry_to_wire(entry), message if body else split_message(message)[0]
        return None, b""

    found = []
    for queue in queues:
        wire, message = in_queue(queue, uid, work)
        if wire is not None:
            found.append((_entry_from_wire(wire), message))
    if not found:
        missing = _missing(queue_id, own_queue_only=uid != 0)
        raise QueueError(missing.code, format_outcome(missing))
    if len(found) > 1:
        where = ", ".join(e.tenant for e, _ in found)
        raise QueueError(
            EX_USAGE, f"{queue_id} is in the queues of {where}: name one with --tenant"
        )
    ((entry, message),) = found
    headers, text = split_message(message) if body else (message, b"")
    if as_json:
        shown = {**entry_json(entry), "headers": headers.decode("utf-8", "replace")}
        if body:
            shown["body"] = text.decode("utf-8", "replace")
        _out(json.dumps(shown) + "\n")
    else:
        parts = [format_entry(entry), "\n", printable_text(headers)]
        if body:
            parts += ["\n", printable_text(text)]
        _out("".join(parts))
    return EX_OK


def _act(
    queues: Sequence[Tenant],
    uid: int,
    verb: Verb,
    ids: Sequence[str] | None,
    as_json: bool,
) -> int:
    """hold, release, requeue or delete: the named messages (all or nothing), or every one."""
    wanted = None if ids is None else frozenset(ids)

    def locate(spool: Spool, tenant: str) -> tuple[Any, bytes]:
        found = index(spool, wanted)
        if wanted is not None and len(found) < len(wanted):
            found.update(index(spool, wanted - found.keys()))  # one that moved as we looked
        return found, b""

    indexes: dict[str, Index] = {}
    outcomes: list[Outcome] = []
    codes = []
    for queue in queues:
        try:
            indexes[queue.domain] = in_queue(queue, uid, locate)[0]
        except QueueError as e:
            if ids is not None:
                raise  # the ID may be there: better change nothing
            _complain(e.message)
            codes.append(e.code)
    if ids is None:
        changes, outcomes = plan_all(verb, indexes)
    else:
        changes, outcomes = plan_named(verb, indexes, ids, own_queue_only=uid != 0)
        if outcomes:
            changes = []
    for queue in queues:
        mine = [c for c in changes if c.tenant == queue.domain]
        if not mine:
            continue

        def work(spool: Spool, tenant: str, mine: list[Change] = mine) -> tuple[Any, bytes]:
            return [dataclasses.asdict(apply(spool, c)) for c in mine], b""

        try:
            outcomes += [Outcome(**o) for o in in_queue(queue, uid, work)[0]]
        except QueueError as e:
            _complain(e.message)
            codes.append(e.code)
    _report(verb, outcomes, as_json)
    return worst([*codes, *(o.code for o in outcomes)])


def _report(verb: Verb, outcomes: Sequence[Outcome], as_json: bool) -> None:
    for outcome in outcomes:
        if outcome.code != EX_OK:
            _complain(format_outcome(outcome))
    if as_json:
        _out("".join(json.dumps(outcome_json(verb, o)) + "\n" for o in outcomes))
    else:
        _out("".join(format_outcome(o) + "\n" for o in outcomes if o.code == EX_OK))


def _flush(queues: Sequence[Tenant], uid: int) -> int:
    def work(spool: Spool, tenant: str) -> tuple[Any, bytes]:
        spool.request_flush()
        return None, b""

    codes = []
    for queue in queues:
        try:
            in_queue(queue, uid, work)
        except QueueError as e:
            _complain(e.message)
            codes.append(e.code)
    return worst(codes)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise QueueError(EX_USAGE, message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="List and manage queued mail.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    tenant = _Parser(add_help=False)
    tenant.add_argument("--tenant", metavar="DOMAIN", help="only this tenant's queue")
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="JSON Lines, like postqueue -j")
    verbs.add_parser("list", parents=[tenant, as_json], help="list queued mail")
    show = verbs.add_parser("show", parents=[tenant, as_json], help="show one message")
    show.add_argument("queue_id", metavar="ID")
    show.add_argument("--body", action="store_true", help="the body too, not only headers")
    for verb in VERBS.values():
        command = verbs.add_parser(verb.name, parents=[tenant, as_json], help=verb.help)
        command.add_argument("queue_ids", metavar="ID", nargs="*")
        command.add_argument("--all", action="store_true", help="every message it applies to")
    verbs.add_parser("flush", parents=[tenant], help="retry deferred mail now")
    return parser


def main(config_path: Path, argv: Sequence[str]) -> int:
    """`nsmail queue ARGV...`; the exit status (see the module's docstring)."""
    try:
        return _run(config_path, argv, os.getuid())
    except QueueError as e:
        _complain(e.message)
        return e.code
    except configuration.ConfigError as e:
        _complain(str(e))
        return EX_CONFIG
    except BrokenPipeError:  # `| head`
        return EX_OK
    except Exception as e:  # a bug: still one line
        _complain(f"internal error: {type(e).__name__}: {printable(str(e))}")
        return EX_SOFTWARE


def _run(config_path: Path, argv: Sequence[str], uid: int) -> int:
    args = _parser().parse_args(argv)
    queue_ids: list[str] = (
        [args.queue_id] if args.verb == "show" else getattr(args, "queue_ids", [])
    )
    bad = [i for i in queue_ids if not valid_queue_id(i)]
    if bad:
        raise QueueError(EX_USAGE, f"bad queue id {printable(bad[0])!r}")
    verb = VERBS.get(args.verb)
    if verb is not None and args.all == bool(queue_ids):
        raise QueueError(EX_USAGE, f"{verb.name}: name messages by ID, or use --all")
    queues = select_queues(configuration.load(config_path), uid, args.tenant)
    if args.verb == "list":
        return _list(queues, uid, args.json)
    if args.verb == "show":
        return _show(queues, uid, args.queue_id, args.body, args.json)
    if args.verb == "flush":
        return _flush(queues, uid)
    assert verb is not None
    return _act(queues, uid, verb, None if args.all else queue_ids, args.json)


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _complain(message: str) -> None:
    print(f"nsmail queue: {message}", file=sys.stderr, flush=True)
