"""The queue manager (nsmail.tenant.qmgr) on a spool in a temporary directory, with a fake
clock and outcomes made up by the test in place of the delivery agents."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from nsmail.core import retry
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Envelope, decode, encode
from nsmail.tenant.qmgr import QueueManager, Taken
from nsmail.tenant.spool import ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, MAILDROP, Spool

POLICY = retry.RetryPolicy(first=300, maximum=4000, lifetime=5 * 86400, delay_warning=4 * 3600)
NOW = 1_800_000_000.0
BODY = b"Subject: hi\r\n\r\nhello\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path: Path, clock: Clock) -> QueueManager:
    spool = Spool(tmp_path / "spool")
    spool.create()
    return QueueManager(
        spool=spool,
        domain="tenant.test",
        foreign_senders=False,
        reporting_mta="mail.tenant.test",
        postmaster="postmaster@abc.test",
        policy=POLICY,
        rng=random.Random(0),
        clock=clock,
    )


def put(
    queue: QueueManager,
    queue_id: str,
    recipients: tuple[str, ...] = ("a@rcpt.test",),
    *,
    state: str = INCOMING,
    sender: str = "alice@tenant.test",
    arrival: float = NOW,
    **fields: object,
) -> str:
    envelope = Envelope(sender, recipients, arrival=arrival, cleaned=True, **fields)  # type: ignore[arg-type]
    queue.spool.put(state, queue_id, [encode(envelope, BODY)])
    return queue_id


def take(queue: QueueManager, queue_id: str, state: str = INCOMING) -> Taken:
    taken = queue.take(state, queue_id)
    assert taken is not None
    return taken


def outcome(recipient: str, status: Status, text: str = "", code: int | None = None) -> Outcome:
    return Outcome(recipient, status, code, text, "mx.rcpt.test[198.51.100.25]:25")


def on_disk(queue: QueueManager, state: str, queue_id: str) -> Envelope:
    return decode(queue.spool.path(state, queue_id).read_bytes())[0]


def states(queue: QueueManager) -> dict[str, list[str]]:
    found = {s: queue.spool.ids(s) for s in (MAILDROP, INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT)}
    return {s: ids for s, ids in found.items() if ids}


def test_take_records_the_next_attempt_before_the_attempt(queue: QueueManager) -> None:
    put(queue, "q1")
    taken = take(queue, "q1")
    assert states(queue) == {ACTIVE: ["q1"]}
    # The file in active/ already says when to try again: a crash now is a retry then.
    assert queue.spool.path(ACTIVE, "q1").stat().st_mtime == taken.retry_at
    assert NOW + 300 * 0.9 <= taken.retry_at <= NOW + 300 * 1.1
    assert queue.spool.recover() == ["q1"] and states(queue) == {INCOMING: ["q1"]}


def test_delivered_mail_leaves_the_queue(queue: QueueManager) -> None:
    taken = take(queue, put(queue, "q1", ("a@rcpt.test", "b@rcpt.test")))
    queue.settle(
        taken,
        [outcome(r, Status.DELIVERED, "2.0.0 ok", 250) for r in ("a@rcpt.test", "b@rcpt.test")],
    )
    assert states(queue) == {}
    assert queue.tally.total == {"sent": 2, "deferred": 0, "bounced": 0}
    assert queue.last_delivery_at == NOW


def test_a_temporary_failure_waits_in_deferred_with_its_reason(
    queue: QueueManager, clock: Clock
) -> None:
    taken = take(queue, put(queue, "q1", ("a@rcpt.test", "b@rcpt.test")))
    clock.now += 10
    queue.settle(
        taken,
        [
            outcome("a@rcpt.test", Status.DELIVERED, "2.0.0 ok", 250),
            outcome("b@rcpt.test", Status.TEMPORARY, "4.2.2 mailbox full", 452),
        ],
    )
    assert states(queue) == {DEFERRED: ["q1"]}
    later = on_disk(queue, DEFERRED, "q1")
    assert later.recipients == ("b@rcpt.test",) and later.attempts == 1
    (why,) = later.deferrals
    assert (why.recipient, why.status, why.code, why.at) == ("b@rcpt.test", "4.2.2", 452, NOW + 10)
    assert queue.spool.path(DEFERRED, "q1").stat().st_mtime == taken.retry_at
    assert queue.due() == [] and queue.next_due == taken.retry_at


def test_a_permanent_failure_bounces_to_the_sender(queue: QueueManager) -> None:
    taken = take(queue, put(queue, "q1"))
    queue.settle(taken, [outcome("a@rcpt.test", Status.PERMANENT, "5.1.1 no such user", 550)])
    (bounce,) = queue.spool.ids(INCOMING)
    assert states(queue) == {INCOMING: [bounce]}
    report = on_disk(queue, INCOMING, bounce)
    assert (report.sender, report.recipients) == ("", ("alice@tenant.test",))


def test_a_bounce_that_cannot_be_delivered_goes_to_the_hosts_postmaster(
    queue: QueueManager,
) -> None:
    """RFC 3464: never a bounce of a bounce; but not only a log line either: the host's
    postmaster hears of it (Postfix's 2bounce_notice_recipient), and it is counted."""
    taken = take(queue, put(queue, "q1", sender="", recipients=("ghost@tenant.test",)))
    queue.settle(taken, [outcome("ghost@tenant.test", Status.PERMANENT, "5.1.1 no such user")])
    (notice,) = queue.spool.ids(INCOMING)
    assert states(queue) == {INCOMING: [notice]}
    envelope, body = decode(queue.spool.path(INCOMING, notice).read_bytes())
    assert (envelope.sender, envelope.recipients) == ("", ("postmaster@abc.test",))
    assert b"Subject: Postmaster Warning: Undelivered Bounce" in body
    assert b"hello" not in body  # the undelivered bounce's header only
    assert queue.double_bounces == 1
    assert queue.report("idle", NOW).double_bounces == 1
    delayed = take(queue, put(queue, "q2", sender=""))
    queue.settle(delayed, [outcome("a@rcpt.test", Status.TEMPORARY, "4.4.1 later")])
    assert queue.double_bounces == 1  # a delay is no bounce: no notice


def test_a_notice_to_the_postmaster_that_cannot_be_delivered_is_held(queue: QueueManager) -> None:
    taken = take(queue, put(queue, "q1", sender="", recipients=("Postmaster@abc.test",)))
    queue.settle(taken, [outcome("Postmaster@abc.test", Status.PERMANENT, "5.1.1 no such user")])
    assert states(queue) == {HOLD: ["q1"]}
    assert queue.double_bounces == 0
    assert queue.last_error == "q1 held: postmaster: 5.1.1 no such user"


def test_mail_that_is_still_undelivered_at_expiry_bounces_once(
    queue: QueueManager, clock: Clock
) -> None:
    taken = take(queue, put(queue, "q1", arrival=NOW - POLICY.lifetime))
    queue.settle(taken, [outcome("a@rcpt.test", Status.TEMPORARY, "4.4.1 no answer")])
    (bounce,) = queue.spool.ids(INCOMING)
    assert states(queue) == {INCOMING: [bounce]}  # no retry left: the original is gone


def test_a_delay_warning_goes_once(queue: QueueManager, clock: Clock) -> None:
    arrival = NOW - POLICY.delay_warning
    taken = take(queue, put(queue, "q1", arrival=arrival))
    queue.settle(taken, [outcome("a@rcpt.test", Status.TEMPORARY, "4.4.1 no answer")])
    assert len(queue.spool.ids(INCOMING)) == 1 and on_disk(queue, DEFERRED, "q1").warned
    queue.spool.move("q1", DEFERRED, INCOMING)
    taken = take(queue, "q1")
    queue.settle(taken, [outcome("a@rcpt.test", Status.TEMPORARY, "4.4.1 no answer")])
    assert len(queue.spool.ids(INCOMING)) == 1  # no second warning


def test_mail_not_attempted_keeps_its_count_and_comes_back_when_told(
    queue: QueueManager, clock: Clock
) -> None:
    taken = take(queue, put(queue, "q1", attempts=3))
    queue.settle(
        taken,
        [outcome("a@rcpt.test", Status.TEMPORARY, "4.4.5 too much mail waiting")],
        attempted=False,
        retry_at=NOW + 60,
    )
    later = on_disk(queue, DEFERRED, "q1")
    assert later.attempts == 3
    assert queue.spool.path(DEFERRED, "q1").stat().st_mtime == NOW + 60
    # Expired is expired, tried this time or not: it bounces, quoting why it waited.
    taken = take(queue, put(queue, "q2", arrival=NOW - POLICY.lifetime))
    stopping = outcome("a@rcpt.test", Status.TEMPORARY, "4.3.2 stopping")
    queue.settle(taken, [stopping], attempted=False)
    assert "q2" not in queue.spool.ids(DEFERRED) and len(queue.spool.ids(INCOMING)) == 1


def test_due_lists_what_falls_due_and_remembers_the_next(queue: QueueManager, clock: Clock) -> None:
    for queue_id, when in (("past", NOW - 5), ("soon", NOW + 60), ("later", NOW + 600)):
        put(queue, queue_id, state=DEFERRED)
        queue.spool.schedule(queue_id, DEFERRED, when)
    put(queue, "new", state=MAILDROP)
    put(queue, "released")
    assert queue.fresh() == [(MAILDROP, "new"), (INCOMING, "released")]
    assert queue.due() == ["past"] and queue.next_due == NOW + 60
    assert sorted(queue.due(flush=True)) == ["later", "past", "soon"]


def test_a_file_dated_past_the_largest_backoff_is_due_by_then(queue: QueueManager) -> None:
    put(queue, "ahead", state=DEFERRED)
    queue.spool.schedule("ahead", DEFERRED, NOW + 30 * 86400)  # the tenant's user set it
    assert queue.due() == []
    assert NOW < queue.next_due <= retry.latest_attempt(POLICY, NOW)


def test_over_the_hourly_limit_mail_is_held(queue: QueueManager) -> None:
    queue.hourly_limit = 1
    queue.spool.put(MAILDROP, "m1", [encode(Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY)])
    queue.spool.put(MAILDROP, "m2", [encode(Envelope("alice@tenant.test", ("a@rcpt.test",)), BODY)])
    assert queue.take(MAILDROP, "m1") is not None
    assert queue.take(MAILDROP, "m2") is None
    assert states(queue) == {ACTIVE: ["m1"], HOLD: ["m2"]}
    assert "per hour" in (queue.last_error or "")


def test_a_foreign_sender_is_quarantined(queue: QueueManager) -> None:
    put(queue, "q1", sender="mallory@elsewhere.test")
    assert queue.take(INCOMING, "q1") is None
    assert states(queue) == {CORRUPT: ["q1"]}


def test_a_full_disk_at_settling_leaves_the_message_deferred(
    queue: QueueManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = take(queue, put(queue, "q1"))

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(queue.spool, "put", full)
    queue.settle(taken, [outcome("a@rcpt.test", Status.TEMPORARY, "4.4.1 no answer")])
    # As it was taken, its next attempt recorded: nothing lost, retried then.
    assert states(queue) == {DEFERRED: ["q1"]}
    assert on_disk(queue, DEFERRED, "q1").attempts == 0
    assert queue.spool.path(DEFERRED, "q1").stat().st_mtime == taken.retry_at


def test_settling_closes_the_body_and_tells_progress(queue: QueueManager) -> None:
    told: list[int] = []
    queue.progress = lambda: told.append(1)
    taken = take(queue, put(queue, "q1"))
    closed: list[bool] = []
    taken.opened.callback(lambda: closed.append(True))
    queue.settle(taken, [outcome("a@rcpt.test", Status.DELIVERED, "2.0.0 ok", 250)])
    assert closed == [True] and told == [1]
