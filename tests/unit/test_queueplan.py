"""The queue tool's pure planning (nsmail.core.queueplan) and listing (nsmail.tenant.queuelist)
(`nsmail queue` run for real: tests/loopback/test_queuetool.py)."""

from __future__ import annotations

from typing import Any

import pytest
from deferred_mail import MX, WAITING

from nsmail.core.queuefile import Deferral, Envelope
from nsmail.core.queueplan import (
    VERBS,
    Change,
    Entry,
    by_destination,
    destination_json,
    entry_json,
    format_by_destination,
    plan_all,
    plan_named,
    split_message,
    worst,
)
from nsmail.core.text import printable_lines
from nsmail.tenant.queuelist import format_entry, format_listing
from nsmail.tenant.spool import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    HOLD,
    INCOMING,
    MAILDROP,
)

EX_USAGE, EX_NOINPUT, EX_TEMPFAIL, EX_NOPERM = 64, 66, 75, 77
HOLD_, RELEASE, REQUEUE, DELETE = (VERBS[v] for v in ("hold", "release", "requeue", "delete"))

# --- pure: planning ---------------------------------------------------------------------


def test_plan_named_moves_exactly_the_named_messages() -> None:
    indexes = {
        "a.test": {"i1": [INCOMING], "d1": [DEFERRED], "h1": [HOLD]},
        "b.test": {"d2": [DEFERRED]},
    }
    changes, refusals = plan_named(HOLD_, indexes, ["d1", "i1", "d1"], own_queue_only=False)
    assert refusals == []
    assert changes == [
        Change("a.test", "d1", DEFERRED, HOLD),
        Change("a.test", "i1", INCOMING, HOLD),
    ]
    # Already where it is asked to go: nothing to do, not an error.
    assert plan_named(HOLD_, indexes, ["h1"], own_queue_only=False) == (
        [Change("a.test", "h1", HOLD, HOLD)],
        [],
    )
    assert plan_named(REQUEUE, indexes, ["h1", "d2"], own_queue_only=False)[0] == [
        Change("a.test", "h1", HOLD, INCOMING),
        Change("b.test", "d2", DEFERRED, INCOMING),
    ]


@pytest.mark.parametrize(
    ("verb", "states", "code", "reason"),
    [
        (HOLD_, [ACTIVE], EX_TEMPFAIL, "being delivered, try again"),
        (DELETE, [MAILDROP], EX_TEMPFAIL, "not yet taken in by the worker"),
        (DELETE, [DEFERRED, ACTIVE], EX_TEMPFAIL, "being delivered"),
        (RELEASE, [DEFERRED], EX_NOINPUT, "is in deferred/; release applies to mail in hold/"),
        (HOLD_, [CORRUPT], EX_NOINPUT, "hold applies to mail in incoming/, deferred/"),
        (HOLD_, [DEFERRED, HOLD], EX_NOINPUT, "has copies in deferred/, hold/"),
    ],
)
def test_plan_named_refuses(verb: Any, states: list[str], code: int, reason: str) -> None:
    changes, refusals = plan_named(verb, {"a.test": {"x1": states}}, ["x1"], own_queue_only=False)
    assert changes == []
    assert [(o.code, o.queue_id) for o in refusals] == [(code, "x1")]
    assert reason in refusals[0].reason


def test_plan_named_unknown_ambiguous_and_not_yours() -> None:
    indexes = {"a.test": {"x1": [DEFERRED]}, "b.test": {"x1": [HOLD]}}
    _, refusals = plan_named(DELETE, indexes, ["x1", "zz"], own_queue_only=False)
    assert [(o.queue_id, o.code) for o in refusals] == [("x1", EX_USAGE), ("zz", EX_NOINPUT)]
    assert "name one with --tenant" in refusals[0].reason
    # A tenant's user cannot tell another queue's message from none: both are not permitted.
    _, refusals = plan_named(DELETE, {"a.test": {}}, ["zz"], own_queue_only=True)
    assert [(o.code, o.reason) for o in refusals] == [(EX_NOPERM, "not in your queue")]


def test_plan_named_delete_takes_every_copy() -> None:
    changes, _ = plan_named(
        DELETE, {"a.test": {"x1": [DEFERRED, HOLD]}}, ["x1"], own_queue_only=False
    )
    assert changes == [Change("a.test", "x1", DEFERRED, None), Change("a.test", "x1", HOLD, None)]


def test_plan_all() -> None:
    index = {
        "m": [MAILDROP],
        "i": [INCOMING],
        "a": [ACTIVE],
        "d": [DEFERRED],
        "h": [HOLD],
        "c": [CORRUPT],
    }
    changes, refusals = plan_all(HOLD_, {"a.test": index})
    assert {(c.queue_id, c.target) for c in changes} == {("i", HOLD), ("d", HOLD)}
    # Still in the worker's hands: hold --all cannot promise they are held.
    assert {(o.queue_id, o.code) for o in refusals} == {("m", EX_TEMPFAIL), ("a", EX_TEMPFAIL)}
    changes, refusals = plan_all(REQUEUE, {"a.test": index})
    assert {(c.queue_id, c.target) for c in changes} == {("d", INCOMING), ("h", INCOMING)}
    assert refusals == []  # mail being delivered is being retried anyway
    changes, refusals = plan_all(DELETE, {"a.test": index})
    assert {c.queue_id for c in changes} == {"i", "d", "h", "c"}
    assert {o.queue_id for o in refusals} == {"m", "a"}
    assert plan_all(RELEASE, {"a.test": index})[0] == [Change("a.test", "h", HOLD, INCOMING)]


def test_worst_prefers_what_a_retry_cannot_fix() -> None:
    assert worst([]) == 0
    assert worst([0, EX_TEMPFAIL, EX_NOINPUT]) == EX_NOINPUT
    assert worst([EX_TEMPFAIL, EX_NOPERM, EX_USAGE]) == EX_USAGE


# --- pure: formatting -------------------------------------------------------------------


def test_format_listing() -> None:
    assert format_listing([]) == "Mail queue is empty\n"
    ok = Envelope("alice@a.test", ("bob@x.test",), arrival=1.7e9, attempts=2)
    text = format_listing(
        [
            Entry("a.test", "0001", DEFERRED, 1500, ok, next_attempt=1.7e9 + 600),
            Entry("a.test", "0002", MAILDROP, 10, Envelope("", (), arrival=1.7e9, extract=True)),
            Entry("a.test", "0003", CORRUPT, 7, None, error="checksum mismatch"),
            Entry(
                "b.test", "0004", HOLD, 1, Envelope("\x1b[2J@x.test", ("\r\n@y",), arrival=1e300)
            ),
        ]
    )
    assert text.startswith("-Queue ID-")
    assert (
        text.index("a.test:\n") < text.index("0001") < text.index("b.test:\n") < text.index("0004")
    )
    assert "(2 attempts, next " in text and "bob@x.test" in text
    assert "(recipients from the headers, -t)" in text
    assert "(unreadable: checksum mismatch)" in text
    assert "\x1b" not in text and "\\x1b[2J@x.test" in text and "\\r\\n@y" in text
    assert text.endswith("-- 2 Kbytes in 4 Requests.\n")


def test_the_listing_says_why_each_message_waits() -> None:
    # Like postqueue -p's parenthesised line: one reason per message, cut to fit.
    text = format_listing([Entry("a.test", "0001", DEFERRED, 1500, WAITING, 1.7e9 + 600)])
    lines = text.splitlines()
    reason = f"({MX} said: 451 4.7.1 greylisted \\x1b[2J) (+1 more)"
    assert lines[lines.index(next(x for x in lines if "1 attempt," in x)) + 1] == reason
    wordy = Deferral("bob@x.test", "4.7.1", "4.7.1 " + "blah " * 100, 451, MX)
    waiting = Envelope("a@a.test", ("bob@x.test",), attempts=1, deferrals=(wordy,))
    listing = format_listing([Entry("a.test", "0002", DEFERRED, 1, waiting, 1.7e9)])
    (line,) = [x for x in listing.splitlines() if x.startswith(f"({MX}")]
    assert len(line) == 79 and line.endswith("...)")


def test_show_says_why_for_each_recipient() -> None:
    entry = Entry("a.test", "0001", DEFERRED, 1500, WAITING, 1.7e9 + 600)
    shown = format_entry(entry)
    assert (
        "Recipient:    bob@x.test\n"
        f"Delay reason: {MX} said: 451 4.7.1 greylisted \\x1b[2J\n"
        "Recipient:    carol@x.test\n"
        f"Delay reason: 4.4.2 {MX}: connection refused\n"
        "Recipient:    dave@x.test\n"  # no reason recorded (written before it was known)
        "Attempts:     1\n"
        "Last attempt: "
    ) in shown
    # postqueue -j's delay_reason per recipient, then nsmail's own fields.
    assert entry_json(entry)["recipients"] == [
        {
            "address": "bob@x.test",
            "delay_reason": f"{MX} said: 451 4.7.1 greylisted \x1b[2J",
            "enhanced_status": "4.7.1",
            "reply_code": 451,
            "relay": MX,
            "last_attempt": 1_700_000_060,
        },
        {
            "address": "carol@x.test",
            "delay_reason": f"4.4.2 {MX}: connection refused",
            "enhanced_status": "4.4.2",
            "reply_code": None,
            "relay": None,
            "last_attempt": 1_700_000_060,
        },
        {"address": "dave@x.test"},
    ]


def test_split_message_and_printable_lines() -> None:
    assert split_message(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore") == (
        b"A: 1\r\nB: 2\r\n",
        b"body\r\n\r\nmore",
    )
    assert split_message(b"A: 1\n") == (b"A: 1\n", b"")
    assert split_message(b"\nbody") == (b"", b"body")
    shown = printable_lines(b"Subject: \x1b]0;pwned\x07\r\n\tfolded\n\xff\n")
    assert shown == "Subject: \\x1b]0;pwned\\x07\n\tfolded\n\ufffd\n"


def test_queued_mail_by_destination() -> None:
    waiting = Deferral("b@slow.test", "4.4.1", "4.4.1 mx.slow.test: timed out", None, "", 150.0)
    older = Deferral("c@slow.test", "4.2.0", "4.2.0 busy", 451, "", 120.0)
    entries = [
        Entry(
            "t.test",
            "q1",
            DEFERRED,
            10,
            Envelope("a@t.test", ("b@slow.test", "x@ok.test"), arrival=100.0, deferrals=(waiting,)),
        ),
        Entry(
            "t.test",
            "q2",
            DEFERRED,
            10,
            Envelope("a@t.test", ("c@slow.test",), arrival=110.0, deferrals=(older,)),
        ),
        Entry("t.test", "q3", HOLD, 10, Envelope("a@t.test", ("d@SLOW.test",), arrival=90.0)),
        Entry("t.test", "bad", CORRUPT, 10, None, error="not a queue file"),
    ]
    rows = by_destination(entries)
    assert [(r.domain, r.messages, r.recipients, r.oldest, dict(r.states)) for r in rows] == [
        ("slow.test", 3, 3, 90.0, {DEFERRED: 2, HOLD: 1}),
        ("ok.test", 1, 1, 100.0, {DEFERRED: 1}),
    ]
    assert rows[0].reason == waiting.reason  # the latest attempt's
    shown = format_by_destination(rows, now=100.0 + 3600).splitlines()
    assert shown[0] == "t.test:"
    assert shown[2].split() == ["slow.test", "3", "3", "1h", "2", "deferred,", "1", "hold"]
    assert shown[3].startswith("    (4.4.1 mx.slow.test: timed out")
    assert destination_json(rows[1], now=160.0)["oldest_age"] == 60.0
