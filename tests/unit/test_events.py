"""nsmail.core.events (the delivery event, its line and its JSON), nsmail.tenant.history
(kept in the tenant's spool, bounded, rotated, read back as hostile) and the [log] format."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
from configs import GOOD_MAIN, LOOKUP, MAIN
from hypothesis import given
from hypothesis import strategies as st

from nsmail.commands.history import since
from nsmail.core import events
from nsmail.core.config import ConfigError, parse
from nsmail.root.systemd import log_formatter
from nsmail.tenant import history
from nsmail.tenant.history import History

EVENT = events.Event(
    time=1717495200.25,
    tenant="bcd.test",
    queue_id="0000018f5a2b3c4d1f2e",
    sender="alice@bcd.test",
    recipient="x1@rcpt.test",
    relay="mx.test[2001:db8:113::25]:25",
    delay=0.1,
    delays=(0.01, 0.02, 0.03, 0.04),
    dsn="2.0.0",
    status="sent",
    reply="250 2.0.0 Ok: queued as 4Xq2",
)


def test_the_line_is_postfixs() -> None:
    assert events.text(EVENT) == (
        "0000018f5a2b3c4d1f2e: tenant=bcd.test from=<alice@bcd.test> to=<x1@rcpt.test>"
        " relay=mx.test[2001:db8:113::25]:25 delay=0.1 delays=0.01/0.02/0.03/0.04"
        " dsn=2.0.0 status=sent (250 2.0.0 Ok: queued as 4Xq2)"
    )
    hostile = dataclasses.replace(EVENT, recipient="a\nb@x.test", reply="\x1b[2J")
    assert "\n" not in events.text(hostile) and "\x1b" not in events.text(hostile)


def test_json_round_trip() -> None:
    line = events.encode(EVENT)
    assert json.loads(line)["time"] == "2024-06-04T10:00:00.250+00:00"
    assert events.decode(line.encode()) == EVENT


def test_long_fields_are_cut_so_a_line_stays_an_event() -> None:
    long = dataclasses.replace(EVENT, reply="ü" * 100_000, sender="s" * 5000)
    line = events.encode(long).encode()
    assert len(line) < events.MAX_LINE
    decoded = events.decode(line)
    assert decoded is not None and decoded.reply == "ü" * events.MAX_FIELD


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b"\xff\xfe",
        b"[" * 100_000,
        events.encode(dataclasses.replace(EVENT, status="stolen")).encode(),
        events.encode(EVENT).encode().replace(b'"delay":0.1', b'"delay":NaN'),
        events.encode(EVENT).encode().replace(b'"delay":0.1', b'"delay":true'),
        events.encode(EVENT).encode().replace(b"+00:00", b""),  # no time zone: no instant
        events.encode(EVENT).encode().replace(b'"reply"', b'"other"'),
        b" " * (events.MAX_LINE + 1),
    ],
)
def test_what_is_no_event_decodes_to_none(line: bytes) -> None:
    assert events.decode(line) is None


@given(st.binary(max_size=300))
def test_decode_never_raises(line: bytes) -> None:
    events.decode(line)


def test_history_appends_and_reads_back(tmp_path: Path) -> None:
    kept = History(tmp_path)
    second = dataclasses.replace(EVENT, recipient="x2@rcpt.test")
    kept.record(EVENT)
    kept.record(second)
    assert list(kept.read()) == [EVENT, second]
    path = tmp_path / "history" / history.CURRENT
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "history").stat().st_mode & 0o777 == 0o700


def test_history_rotates_at_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = len(events.encode(EVENT)) + 1
    monkeypatch.setattr(history, "MAX_FILE", 3 * size)
    kept = History(tmp_path)
    numbered = [dataclasses.replace(EVENT, queue_id=f"{i:020x}") for i in range(8)]
    for event in numbered:
        kept.record(event)
    # The current file and the one before it: at most twice the bound, the newest kept.
    assert list(kept.read()) == numbered[3:]
    directory = tmp_path / "history"
    assert sorted(p.name for p in directory.iterdir()) == [history.CURRENT, history.PREVIOUS]
    assert all(p.stat().st_size <= 3 * size for p in directory.iterdir())


def test_history_the_tenant_removed_starts_again(tmp_path: Path) -> None:
    kept = History(tmp_path)
    kept.record(EVENT)
    os.unlink(tmp_path / "history" / history.CURRENT)
    second = dataclasses.replace(EVENT, recipient="x2@rcpt.test")
    kept.record(second)
    assert list(kept.read()) == [second]


def test_history_held_open_never_follows_a_symlink_planted_since(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = History(tmp_path)
    kept.record(EVENT)
    target = tmp_path / "elsewhere"
    target.write_text("")
    current = tmp_path / "history" / history.CURRENT
    os.unlink(current)
    os.symlink(target, current)
    kept.record(EVENT)  # logged, not raised, and not written through the link
    assert target.read_text() == ""
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_history_skips_garbage_the_tenant_wrote(tmp_path: Path) -> None:
    kept = History(tmp_path)
    kept.record(EVENT)
    with open(tmp_path / "history" / history.CURRENT, "ab") as planted:
        planted.write(b"garbage\n" + b"x" * (3 * events.MAX_LINE) + b"\n{}\n\xff\n")
    kept.record(EVENT)
    assert list(kept.read()) == [EVENT, EVENT]


def test_history_never_follows_a_planted_symlink_nor_fails_a_delivery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "history").mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(target, tmp_path / "history" / history.CURRENT)
    kept = History(tmp_path)
    kept.record(EVENT)  # logged, not raised
    kept.record(EVENT)  # and said once
    assert target.read_text() == ""
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    os.unlink(tmp_path / "history" / history.CURRENT)
    os.mkfifo(tmp_path / "history" / history.CURRENT)
    kept.record(EVENT)  # a FIFO neither blocks the worker nor is written to
    with pytest.raises(OSError, match="not a regular file"):
        list(kept.read())


def test_since_takes_a_span_or_a_date() -> None:
    now = 1717495200.0
    assert since("30m", now) == now - 1800
    assert since("7d", now) == now - 7 * 86400
    assert since("2024-06-04T10:00:00+00:00", now) == now
    with pytest.raises(ValueError):
        since("yesterday", now)


def test_log_format_is_text_or_json() -> None:
    assert parse([(MAIN, GOOD_MAIN)], LOOKUP).log_format == "text"
    assert parse([(MAIN, GOOD_MAIN + '\n[log]\nformat = "json"\n')], LOOKUP).log_format == "json"
    for bad in ('format = "xml"', "format = 1", 'file = "/var/log/x"'):
        with pytest.raises(ConfigError, match=r"log\.(format|file)"):
            parse([(MAIN, GOOD_MAIN + f"\n[log]\n{bad}\n")], LOOKUP)


def _record(message: str, event: events.Event | None = None) -> logging.LogRecord:
    record = logging.LogRecord("nsmail.tenant.qmgr", logging.INFO, "", 0, message, (), None)
    if event is not None:
        record.event = event
    return record


def test_the_json_format_writes_the_event_and_every_other_line_as_json() -> None:
    formatter = log_formatter({}, "json")
    assert events.decode(formatter.format(_record("line", EVENT)).encode()) == EVENT
    other = json.loads(formatter.format(_record("worker started")))
    assert other["message"] == "worker started" and other["level"] == "info"
    journal = log_formatter({"JOURNAL_STREAM": "8:1"}, "json").format(_record("x", EVENT))
    assert journal.startswith("<6>{") and events.decode(journal[3:].encode()) == EVENT
    text = log_formatter({"JOURNAL_STREAM": "8:1"}).format(_record(events.text(EVENT), EVENT))
    assert text == f"<6>nsmail.tenant.qmgr: {events.text(EVENT)}"
