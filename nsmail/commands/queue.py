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
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn

from nsmail.core.addresses import same_domain
from nsmail.core.config import Config, ConfigError, Tenant, host_identity
from nsmail.core.exitcodes import (
    EX_CONFIG,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
)
from nsmail.core.headers import MAX_HEADER_BYTES
from nsmail.core.layout import STATES
from nsmail.core.queuefile import envelope_of, valid_queue_id
from nsmail.core.queueplan import (
    IN_WORKERS_HANDS,
    VERBS,
    Change,
    Entry,
    Index,
    Outcome,
    Verb,
    destination_json,
    entry_json,
    format_by_destination,
    format_outcome,
    missing,
    outcome_json,
    plan_all,
    plan_named,
    split_message,
    worst,
)
from nsmail.core.queueplan import (
    by_destination as by_destination_rows,
)
from nsmail.core.text import printable, printable_lines
from nsmail.host import configfile
from nsmail.root.jail import run_as
from nsmail.submit.maildrop import write_all
from nsmail.tenant.queuelist import describe, format_entry, format_listing, load, scan
from nsmail.tenant.spool import Spool

PROG = "nsmail queue"
MAX_SHOWN = 256 << 20  # `show --body` reads the message into memory up to this size


class QueueError(Exception):
    """A refusal: the exit status and the one line that explains it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- in a queue, with its owner's rights -----------------------------------------------


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
        reason = IN_WORKERS_HANDS.get(now[0], f"moved to {now[0]}/ meanwhile, try again")
        return dataclasses.replace(done, source=now[0], code=EX_TEMPFAIL, reason=reason)
    except OSError as e:
        return dataclasses.replace(done, code=EX_TEMPFAIL, reason=describe(e))
    return done


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
        code = run_as(queue.uid, queue.gid, lambda: write_all(fd, _framed(work, queue)))
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
        head, payload = {"error": describe(e) + where}, b""
    return json.dumps(head).encode("ascii") + b"\n" + payload


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
        named = [q for q in every if same_domain(q.domain, wanted)]
        if not named:
            raise QueueError(EX_USAGE, f"no such tenant: {printable(wanted)}")
        return named
    mine = next((q for q in every if q.uid == caller_uid), None)
    if mine is None:
        raise QueueError(EX_NOPERM, f"uid {caller_uid} is neither root nor a tenant's user")
    if wanted is not None and not same_domain(wanted, mine.domain):
        raise QueueError(EX_NOPERM, f"you may act only on the queue of {mine.domain}")
    return [mine]


def in_each_queue(
    queues: Sequence[Tenant], caller_uid: int, work: Work, complain: Callable[[str], None]
) -> tuple[list[Any], list[int]]:
    """`in_queue` on each of `queues`: the JSON values of those read, and the exit codes of
    those that could not be, each complained of (one unreadable queue hides no other)."""
    values, codes = [], []
    for queue in queues:
        try:
            value, _ = in_queue(queue, caller_uid, work)
        except QueueError as e:
            complain(e.message)
            codes.append(e.code)
            continue
        values.append(value)
    return values, codes


def _list(queues: Sequence[Tenant], uid: int, as_json: bool, by_destination: bool) -> int:
    def work(spool: Spool, tenant: str) -> tuple[Any, bytes]:
        return [_entry_to_wire(e) for e in scan(spool, tenant)], b""

    listed, codes = in_each_queue(queues, uid, work, _complain)
    entries = [_entry_from_wire(w) for wires in listed for w in wires]
    if by_destination:
        rows, now = by_destination_rows(entries), time.time()
        if as_json:
            _out("".join(json.dumps(destination_json(r, now)) + "\n" for r in rows))
        else:
            _out(format_by_destination(rows, now))
    elif as_json:
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
        refusal = missing(queue_id, own_queue_only=uid != 0)
        raise QueueError(refusal.code, format_outcome(refusal))
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
        parts = [format_entry(entry), "\n", printable_lines(headers)]
        if body:
            parts += ["\n", printable_lines(text)]
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


def parser() -> argparse.ArgumentParser:
    """The parser of `nsmail queue`'s words (also read by the completion and man page tests)."""
    parser = _Parser(prog=PROG, description="List and manage queued mail.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    tenant = _Parser(add_help=False)
    tenant.add_argument("--tenant", metavar="DOMAIN", help="only this tenant's queue")
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="JSON Lines, like postqueue -j")
    listing = verbs.add_parser("list", parents=[tenant, as_json], help="list queued mail")
    listing.add_argument(
        "--by-destination",
        action="store_true",
        help="per recipient domain: messages, oldest, states, why (like qshape)",
    )
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
    except ConfigError as e:
        _complain(str(e))
        return EX_CONFIG
    except BrokenPipeError:  # `| head`
        return EX_OK
    except Exception as e:  # a bug: still one line
        _complain(f"internal error: {type(e).__name__}: {printable(str(e))}")
        return EX_SOFTWARE


def _run(config_path: Path, argv: Sequence[str], uid: int) -> int:
    args = parser().parse_args(argv)
    queue_ids: list[str] = (
        [args.queue_id] if args.verb == "show" else getattr(args, "queue_ids", [])
    )
    bad = [i for i in queue_ids if not valid_queue_id(i)]
    if bad:
        raise QueueError(EX_USAGE, f"bad queue id {printable(bad[0])!r}")
    verb = VERBS.get(args.verb)
    if verb is not None and args.all == bool(queue_ids):
        raise QueueError(EX_USAGE, f"{verb.name}: name messages by ID, or use --all")
    queues = select_queues(configfile.load(config_path), uid, args.tenant)
    if args.verb == "list":
        return _list(queues, uid, args.json, args.by_destination)
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
