"""The queue manager: takes mail from the queue, settles what each attempt came to.

It knows the spool's states and the retry policy; the delivery engine (nsmail.tenant.engine)
delivers in between, many messages at once, and brings back one outcome per recipient.
`take` records the next attempt time first (as the file's mtime) and moves the message to
active/, so a crash at any moment ends in a retry at that time, never in a loss or a hot
loop; `settle` logs each outcome, bounces what failed for good (an RFC 3464 report to the
envelope sender, queued as a new message with the null sender) and defers the rest.
Null-sender mail never bounces (RFC 3464 / RFC 5321 6.1): when a bounce finds no one to
take it, a notice goes to the host's postmaster instead (a double bounce, as Postfix's
2bounce_notice_recipient), counted and logged; and a notice to the postmaster that
cannot be delivered is held for an operator. Nothing taken in ends as a log line only.

Security: runs as the tenant in its jail. Every queue file is tenant-written: a file that
does not decode, or a message whose headers cannot be completed, goes to `corrupt/` with
a log line and never stops the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from nsmail.core import addresses, dkim, dsn, events, headers, retry
from nsmail.core.message import MAX_LINE, Body, Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Deferral, Envelope, QueueFileError, frame
from nsmail.core.report import (
    MAX_DESTINATIONS,
    MAX_TEXT,
    QUEUE_STATES,
    TLS_POLICIES,
    Destination,
    Report,
    Tally,
)
from nsmail.core.text import printable
from nsmail.tenant.history import History
from nsmail.tenant.spool import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    HOLD,
    INCOMING,
    MAILDROP,
    Spool,
    new_queue_id,
)

log = logging.getLogger("nsmail.tenant.qmgr")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


Loaded = tuple[Envelope, Message]
# Enough of a message's start for its header section; more is a HeaderError anyway.
_HEAD_PREFIX = headers.MAX_HEADER_BYTES + 2 * MAX_LINE


@dataclass(eq=False)
class Taken:
    """A message between `take` and `settle`: on disk in active/, its body open."""

    queue_id: str
    envelope: Envelope  # as cleaned: headers completed, recipients de-duplicated
    message: Message
    retry_at: float  # its next attempt, recorded before this one
    taken_at: float
    opened: contextlib.ExitStack  # closed by `settle`


@dataclass(frozen=True, slots=True)
class Delays:
    """Seconds of one recipient's attempt, after it was taken: waiting for a session
    (routing included), opening it (0 for a kept one), transferring."""

    waiting: float = 0.0
    connecting: float = 0.0
    transferring: float = 0.0


@dataclass
class QueueManager:
    """One tenant's queue, worked by one (single-threaded) worker."""

    spool: Spool
    domain: str
    foreign_senders: bool  # may the envelope sender be outside `domain`?
    reporting_mta: str  # the name bounces come from: the tenant's EHLO name
    postmaster: str  # the host's postmaster (postmaster@<host name>), who gets double bounces
    policy: retry.RetryPolicy
    rng: random.Random
    clock: Callable[[], float]
    # The host's queue takes files from every local user: who submitted a file is its
    # owner (the kernel's word), named by this map; tenants' users must use their own.
    owners: Mapping[int, str] | None = None
    tenant_uids: frozenset[int] = frozenset()
    # The worker's own uid: its SMTP sessions' files keep the submitter the kernel named.
    own_uid: int | None = None
    signer: dkim.Signer | None = None  # signs what is taken in and the bounces (DKIM)
    # Sending limits (0: none): over them, mail is held for an operator, never lost.
    hourly_limit: int = 0
    recipient_limit: int = 0
    _taken_in: deque[float] = field(default_factory=deque)  # when, in the last hour
    next_due: float = 0.0  # earliest next attempt among deferred messages
    progress: Callable[[], None] = lambda: None  # told after every attempt (status reports)
    history: History | None = None  # where each attempt's event is kept, for `nsmail log`
    # What the worker reports to the supervisor (nsmail.core.report).
    tally: Tally = field(default_factory=Tally)
    last_error: str | None = None
    last_error_at: float | None = None
    last_delivery_at: float | None = None
    double_bounces: int = 0  # since the worker started

    def counts(self) -> dict[str, int]:
        return {state: len(self.spool.ids(state)) for state in QUEUE_STATES}

    def report(
        self,
        state: str,
        now: float,
        *,
        sessions: int = 0,
        destinations: tuple[Destination, ...] = (),
        tls_failures: Mapping[str, int] | None = None,
    ) -> Report:
        return Report(
            sessions=sessions,
            destinations=destinations[:MAX_DESTINATIONS],
            tls_failures={p: (tls_failures or {}).get(p, 0) for p in TLS_POLICIES},
            domain=self.domain,
            state=state,
            queue=self.counts(),
            total=dict(self.tally.total),
            hour=self.tally.last_hour(now),
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            last_delivery_at=self.last_delivery_at,
            next_due=self.next_due if self.next_due < float("inf") else None,
            taken=self.taken_in_last_hour(now),
            latency_counts=tuple(self.tally.latency_counts),
            latency_sum=self.tally.latency_sum,
            double_bounces=self.double_bounces,
        )

    def counting_toward_a_limit(self, now: float) -> bool:
        """Whether mail taken in within the last hour still counts toward `hourly_limit`
        (a worker that retires keeps it exact by staying until the hour is up)."""
        return bool(self.hourly_limit and self.taken_in_last_hour(now))

    def taken_in_last_hour(self, now: float) -> int:
        while self._taken_in and self._taken_in[0] <= now - 3600:
            self._taken_in.popleft()
        return len(self._taken_in)

    def carry_over(self, taken: int, at: float) -> None:
        """Count `taken` messages of an earlier worker (its last report, at `at`) toward
        `hourly_limit`, as if all were taken at `at`: a worker that was killed must not
        start the hour afresh, and counting them late errs on the side of the limit."""
        self._taken_in.extend([at] * min(taken, self.hourly_limit))

    def recover(self) -> None:
        for queue_id in self.spool.recover():
            log.info("%s: was being delivered when the worker stopped; will retry", queue_id)

    # -- taking submitted mail in --------------------------------------------------------

    def fresh(self) -> list[tuple[str, str]]:
        """Everything sendmail dropped off, then everything released, requeued or bounced
        into incoming/: taken in at once, before deferred mail (a full maildrop must not
        wait behind a queue of retries)."""
        return [(MAILDROP, q) for q in self.spool.ids(MAILDROP)] + [
            (INCOMING, q) for q in self.spool.ids(INCOMING)
        ]

    def due(self, *, flush: bool = False) -> list[str]:
        """The deferred messages whose time has come (all of them on flush); `next_due`
        becomes the earliest of the others."""
        now = self.clock()
        due: list[str] = []
        self.next_due = float("inf")
        latest = retry.latest_attempt(self.policy, now)
        for queue_id in self.spool.ids(DEFERRED):
            when = self.spool.next_attempt(queue_id, latest)
            if when is None:
                continue
            if flush or when <= now:
                due.append(queue_id)
            else:
                self.next_due = min(self.next_due, when)
        return due

    def _clean(self, state: str, queue_id: str, envelope: Envelope, body: Body) -> Loaded | None:
        """Complete the headers in memory (RFC 5322 3.6; like Postfix's cleanup).

        Deterministic, from the file alone (Date from the arrival time, Message-ID from
        the queue id), so it gives the same message at every attempt: the file is only
        rewritten, cleaned, when the message has to wait. Only the header section is
        read into memory; the body stays in the file. None: quarantined.
        """
        if self.owners is not None and state == MAILDROP:
            uid = self.spool.owner(MAILDROP, queue_id)
            if uid in self.tenant_uids:
                self._quarantine(MAILDROP, queue_id, f"uid {uid} is a tenant's: not host mail")
                return None
            if uid != self.own_uid:
                submitter = self.owners.get(uid, f"uid{uid}")
                envelope = dataclasses.replace(envelope, submitter=submitter)
        arrival = envelope.arrival or self.clock()
        prefix = body.read(0, _HEAD_PREFIX)
        head_length = headers.header_length(prefix)
        try:
            done = headers.complete(
                prefix[:head_length],
                headers.Completion(
                    domain=self.domain,
                    local_user=envelope.submitter or "postmaster",
                    full_name=envelope.full_name or None,
                    envelope_sender=envelope.sender,
                    now=datetime.fromtimestamp(arrival).astimezone(),
                    unique=queue_id,
                    extract_recipients=envelope.extract,
                ),
            )
        except headers.HeaderError as e:
            as_stored = Message(b"", body)
            self._give_back(
                state, queue_id, envelope, as_stored, f"5.6.0 headers cannot be completed: {e}"
            )
            return None
        message = Message(done.message, body.after(head_length))
        recipients = tuple(dict.fromkeys((*envelope.recipients, *done.recipients)))
        if not recipients:  # -t, and none in the header (the decoder wants them otherwise)
            why = "5.1.0 no recipient addresses found in header"
            self._give_back(state, queue_id, envelope, message, why)
            return None
        cleaned = dataclasses.replace(
            envelope, recipients=recipients, extract=False, cleaned=True, arrival=arrival
        )
        return cleaned, message if self.signer is None else self.signer.sign(message, arrival)

    def _give_back(
        self, state: str, queue_id: str, envelope: Envelope, message: Message, why: str
    ) -> None:
        """Mail taken in that can be sent nowhere: a bounce to its sender (none for the
        null sender), then quarantined; never only a log line. In that order, so a crash
        between the two repeats the bounce rather than lose it."""
        # Like Postfix's cleanup, "unknown" stands for recipients there are none of.
        unsent = envelope.recipients or ("unknown",)
        failures = [Outcome(r, Status.PERMANENT, 550, why, "") for r in unsent]
        self._bounce(queue_id, envelope, message, failures, self.clock(), delayed=False)
        self._quarantine(state, queue_id, why.partition(" ")[2])

    def _hold_if_over_limit(self, queue_id: str, envelope: Envelope, message: Message) -> bool:
        now = self.clock()
        over = self._over_limit(len(envelope.recipients), now)
        if not over:
            self._taken_in.append(now)
            return False
        self.last_error, self.last_error_at = f"{queue_id} held: {over}", now
        log.warning("%s: tenant=%s held: %s", queue_id, self.domain, over)
        # Same id in both states: a crash between the two steps repeats, never duplicates.
        self.spool.put(HOLD, queue_id, frame(envelope, message.raw()))
        self.spool.remove(MAILDROP, queue_id)
        return True

    def _over_limit(self, recipients: int, now: float) -> str | None:
        if self.recipient_limit and recipients > self.recipient_limit:
            return f"{recipients} recipients, over the limit of {self.recipient_limit}"
        if self.hourly_limit and self.taken_in_last_hour(now) >= self.hourly_limit:
            return f"the limit of {self.hourly_limit} messages per hour is reached"
        return None

    # -- attempts -----------------------------------------------------------------------

    def take(self, state: str, queue_id: str) -> Taken | None:
        """The message `state`/`queue_id`, its next attempt recorded and moved to active/,
        its body open until `settle`; None if it is not to be attempted now (settled
        meanwhile, held over a limit, quarantined, or the file system failed)."""
        opened = contextlib.ExitStack()
        try:
            taken = self._take(state, queue_id, opened)
        except OSError as e:
            # One message's trouble with the file system (a full disk, a file the tenant
            # swapped) stops only that message, until the next scan.
            log.error("%s: file system error, will retry: %s", queue_id, e)
            self._back_to_deferred(queue_id)
            taken = None
        except BaseException:
            opened.close()
            raise
        if taken is None:
            opened.close()
        return taken

    def _take(self, state: str, queue_id: str, opened: contextlib.ExitStack) -> Taken | None:
        try:
            envelope, body, _ = opened.enter_context(self.spool.open_message(state, queue_id))
        except FileNotFoundError:
            return None  # settled meanwhile
        except (OSError, QueueFileError) as e:
            self._quarantine(state, queue_id, str(e))
            return None
        if not self._sender_allowed(state, queue_id, envelope):
            return None
        # "cleaned" is the worker's own mark, but the submitter can forge it: a file in
        # maildrop is as submitted, whatever it says (owner check, limits, signing).
        if envelope.cleaned and state != MAILDROP:
            message = Message(b"", body)
        else:
            loaded = self._clean(state, queue_id, envelope, body)
            if loaded is None:
                return None
            envelope, message = loaded
            if state == MAILDROP and self._hold_if_over_limit(queue_id, envelope, message):
                return None
            if state == MAILDROP and self.owners is not None:
                # The host's maildrop holds other users' files: take a copy of our own
                # (its time stamp must be ours to set) before touching it.
                self.spool.put(INCOMING, queue_id, frame(envelope, message.raw()))
                self.spool.remove(MAILDROP, queue_id)
                state = INCOMING
        now = self.clock()
        retry_at = retry.next_attempt(
            self.policy, envelope.arrival, envelope.attempts + 1, now, self.rng.random()
        )
        try:
            self.spool.schedule(queue_id, state, retry_at)
            self.spool.move(queue_id, state, ACTIVE)
        except FileNotFoundError:  # held, requeued or deleted (`nsmail queue`) since read
            return None
        return Taken(queue_id, envelope, message, retry_at, now, opened)

    def settle(
        self,
        taken: Taken,
        outcomes: Sequence[Outcome],
        delays: Mapping[str, Delays] | None = None,
        *,
        attempted: bool = True,
        retry_at: float | None = None,
    ) -> None:
        """What the attempt of `taken` came to: one outcome per recipient. `attempted`:
        False when nothing was tried (the worker stopped, its destination had a backlog):
        the attempt is not counted, and it is due again at `retry_at` (default: now)."""
        try:
            self._settle(taken, list(outcomes), delays or {}, attempted, retry_at)
        except OSError as e:
            log.error("%s: file system error, will retry: %s", taken.queue_id, e)
            # Failed mid-way (a bounce or the rewrite found the disk full): the file is as
            # it was when taken, and its mtime already says when to retry. Nothing scans
            # active/ but recovery at start, so it waits in deferred/.
            self._back_to_deferred(taken.queue_id)
        finally:
            taken.opened.close()
            self.progress()

    def _back_to_deferred(self, queue_id: str) -> None:
        with contextlib.suppress(OSError):
            self.spool.move(queue_id, ACTIVE, DEFERRED)
            latest = retry.latest_attempt(self.policy, self.clock())
            self.next_due = min(self.next_due, self.spool.next_attempt(queue_id, latest) or 0.0)

    def _settle(
        self,
        taken: Taken,
        outcomes: list[Outcome],
        delays: Mapping[str, Delays],
        attempted: bool,
        retry_at: float | None,
    ) -> None:
        queue_id, envelope, message = taken.queue_id, taken.envelope, taken.message
        now = self.clock()
        self._log(taken, outcomes, delays, now)
        temporary = [o for o in outcomes if o.status == Status.TEMPORARY]
        # Why each recipient waits, for the queue tools (one outcome per recipient).
        waiting = {
            o.recipient: Deferral.bounded(
                o.recipient, _enhanced_status(o), o.text, o.code, o.relay, now
            )
            for o in temporary
        }
        pending = tuple(waiting)
        failed = [o for o in outcomes if o.status == Status.PERMANENT]
        if pending and retry.expired(self.policy, envelope.arrival, now):
            failed += [_expired(o, waiting[o.recipient]) for o in temporary]
            pending = ()
        if failed and not envelope.sender and self._to_postmaster(envelope):
            self._hold_notice(queue_id, failed)
            return
        if failed:
            self._bounce(queue_id, envelope, message, failed, now, delayed=False)
        if not pending:
            self.spool.remove(ACTIVE, queue_id)
            return
        warned = envelope.warned
        if not warned and retry.warn_delay(self.policy, envelope.arrival, now, warned):
            self._bounce(queue_id, envelope, message, temporary, now, delayed=True)
            warned = True
        later = dataclasses.replace(
            envelope,
            recipients=pending,
            attempts=envelope.attempts + attempted,
            warned=warned,
            deferrals=tuple(waiting.values()),
        )
        when = taken.retry_at if attempted else (retry_at or now)
        self.spool.put(ACTIVE, queue_id, frame(later, message.raw()))
        self.spool.schedule(queue_id, ACTIVE, when)
        self.spool.move(queue_id, ACTIVE, DEFERRED)
        self.next_due = min(self.next_due, when)

    def _log(
        self, taken: Taken, outcomes: list[Outcome], delays: Mapping[str, Delays], now: float
    ) -> None:
        """One event per recipient and attempt (nsmail.core.events), logged as Postfix's
        smtp(8) lines are, kept in the history and counted.
        `delays` splits the time as Postfix's delays=a/b/c/d does: in the queue before this
        attempt, waiting here for a session, opening it, transferring."""
        envelope = taken.envelope
        queued = max(0.0, taken.taken_at - envelope.arrival)
        for o in outcomes:
            self.tally.add(str(o.status), now)
            reply = f"{o.code or ''} {o.text}".strip()
            if o.status == Status.DELIVERED:
                self.last_delivery_at = now
                self.tally.observe_latency(now - envelope.arrival)
            else:
                self.last_error = printable(f"<{o.recipient}>: {reply}")[:MAX_TEXT]
                self.last_error_at = now
            split = delays.get(o.recipient, Delays())
            event = events.Event(
                time=now,
                tenant=self.domain,
                queue_id=taken.queue_id,
                sender=envelope.sender,
                recipient=o.recipient,
                relay=o.relay or "none",
                delay=max(0.0, now - envelope.arrival),
                delays=(queued, split.waiting, split.connecting, split.transferring),
                dsn=_enhanced_status(o),
                status=str(o.status),
                reply=reply,
                tls=o.tls,
            )
            # The JSON log format (nsmail.root.systemd) writes the event itself.
            log.info("%s", events.text(event), extra={"event": event})
            if self.history is not None:
                self.history.record(event)

    # -- bounces ------------------------------------------------------------------------

    def _bounce(
        self,
        queue_id: str,
        envelope: Envelope,
        message: Message,
        outcomes: list[Outcome],
        now: float,
        *,
        delayed: bool,
    ) -> None:
        # RFC 3464 / RFC 5321 6.1: never bounce a bounce; the postmaster hears of it.
        double = not envelope.sender
        if double and delayed:
            return
        bounce_id = new_queue_id(now)
        to = self.postmaster if double else envelope.sender
        report = dsn.bounce(
            reporting_mta=self.reporting_mta,
            original_sender=to,
            failures=[_failure(o, delayed) for o in outcomes],
            # One byte over the limit is enough for dsn to return the header only.
            original=message.prefix(dsn.MAX_ORIGINAL + 1),
            arrival=datetime.fromtimestamp(envelope.arrival or now).astimezone(),
            now=datetime.fromtimestamp(now).astimezone(),
            unique=bounce_id,
            delayed=delayed,
            double=double,
        )
        notice = Message.of(report)
        if self.signer is not None:
            notice = self.signer.sign(notice, now)
        notified = Envelope(sender="", recipients=(to,), arrival=now, cleaned=True)
        self.spool.put(INCOMING, bounce_id, frame(notified, notice.raw()))
        if double:
            self.double_bounces += 1
            log.warning("%s: double bounce: notice %s to <%s>", queue_id, bounce_id, to)
        else:
            kind = "delay" if delayed else "non-delivery"
            log.info("%s: %s notice %s to <%s>", queue_id, kind, bounce_id, to)

    def _to_postmaster(self, envelope: Envelope) -> bool:
        return [r.lower() for r in envelope.recipients] == [self.postmaster]

    def _hold_notice(self, queue_id: str, failed: list[Outcome]) -> None:
        """A notice to the postmaster that cannot be delivered: with no one left to tell,
        it waits in hold/ for an operator (`nsmail queue list`), never dropped."""
        why = printable(failed[0].text)[:MAX_TEXT]
        self.last_error, self.last_error_at = f"{queue_id} held: postmaster: {why}", self.clock()
        log.error(
            "%s: held: the notice to <%s> cannot be delivered: %s", queue_id, self.postmaster, why
        )
        self.spool.move(queue_id, ACTIVE, HOLD)

    # -- files ----------------------------------------------------------------------------

    def _sender_allowed(self, state: str, queue_id: str, envelope: Envelope) -> bool:
        # The tenant owns its spool and can write queue files without sendmail: its
        # sender rule is enforced here, where the tenant cannot skip it.
        domain = addresses.split(envelope.sender)[1]
        if (
            envelope.sender
            and not addresses.same_domain(domain, self.domain)
            and not self.foreign_senders
        ):
            self._quarantine(state, queue_id, f"sender <{envelope.sender}> is not in {self.domain}")
            return False
        return True

    def _quarantine(self, state: str, queue_id: str, why: str) -> None:
        log.error("%s: moved to %s/: %s", queue_id, CORRUPT, why)
        try:
            self.spool.move(queue_id, state, CORRUPT)
        except OSError as e:
            log.error("%s: cannot quarantine: %s", queue_id, e)


def _expired(outcome: Outcome, last: Deferral) -> Outcome:
    # nsmail's decision, not a reply: whatever the server said last is only quoted.
    text = f"4.4.7 message expired in the queue; last error: {last.reason}"
    return dataclasses.replace(outcome, status=Status.PERMANENT, code=None, text=text)


def _enhanced_status(outcome: Outcome) -> str:
    """RFC 3463 status of an outcome: from the reply text, else from the reply code."""
    found = _ENHANCED.match(outcome.text)
    if found:
        return found.group(0)
    first = {Status.DELIVERED: "2", Status.TEMPORARY: "4", Status.PERMANENT: "5"}[outcome.status]
    return f"{first}.0.0"


def _failure(outcome: Outcome, delayed: bool) -> dsn.Failure:
    status = _enhanced_status(outcome)
    if delayed and status.startswith("5"):
        status = "4" + status[1:]
    replied = outcome.code is not None  # else nsmail decided: no server said anything
    return dsn.Failure(
        recipient=outcome.recipient,
        status=status,
        action="delayed" if delayed else "failed",
        diagnostic=f"smtp; {outcome.code} {outcome.text}" if replied else None,
        remote_mta=(outcome.relay.partition("[")[0] or None) if replied else None,
        detail=None if replied else outcome.text,
    )
