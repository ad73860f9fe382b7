"""Streaming a message: the same bytes as completing it whole, wherever the pieces are cut."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nsmail.core.headers import Completion, HeaderError, complete, header_length
from nsmail.core.message import MAX_LINE, Lines, MemoryBody, Message, dot_stuffed
from nsmail.tenant.spool import FileBody

COMPLETION = Completion(
    domain="bcd.test",
    local_user="alice",
    full_name=None,
    envelope_sender="alice@bcd.test",
    now=datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=1))),
    unique="q1",
    extract_recipients=False,
)
# Bytes rich in what the line rules care about: line ends, NUL, dots, UTF-8 lead bytes.
messy = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\0", b".", b"x", b" ", b"H: v", b"\xc3\xa9", b"\xa9"])
    | st.binary(max_size=40)
    | st.sampled_from([b"y" * 997, b"\xc3\xa9" * 600, b"z" * 2500]),
    max_size=60,
).map(b"".join)


def pieces_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=400, deadline=None)
@given(messy, st.lists(st.integers(min_value=0), max_size=8))
@example(b"abc\r", [4])
@example(b"\r\x00\n", [])  # CR NUL LF is one line end, as `complete` sees it
@example(b".." + b"y" * 1994 + b"\r", [])  # a line of twice MAX_LINE, then a lone CR
@example(b"a" * 2000 + b"\r\n", [1000, 1001])
def test_streamed_lines_equal_completing_the_whole_message(raw: bytes, cuts: list[int]) -> None:
    try:
        whole = complete(raw, COMPLETION).message
    except HeaderError:
        return
    length = header_length(raw)
    head = complete(raw[:length], COMPLETION).message
    lines = Lines()
    streamed = head + b"".join(lines.feed(p) for p in pieces_of(raw[length:], cuts)) + lines.end()
    assert streamed == whole


@settings(max_examples=200, deadline=None)
@given(messy)
def test_wire_form_has_only_short_crlf_lines(raw: bytes) -> None:
    wire = b"".join(Message.of(raw).wire())
    assert b"\0" not in wire
    if raw.replace(b"\0", b""):
        assert wire.endswith(b"\r\n")
    for line in wire.split(b"\r\n")[:-1]:
        assert b"\r" not in line and b"\n" not in line and len(line) <= MAX_LINE


def test_dot_stuffing_doubles_leading_dots_only() -> None:
    wire = list(Message(b"", MemoryBody(b".\n..x\na.b\n.")).wire())
    assert b"".join(dot_stuffed(wire)) == b"..\r\n...x\r\na.b\r\n..\r\n"


def test_a_file_body_is_read_in_pieces_without_moving_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "q"
    path.write_bytes(b"FRAMING" + b"line\n" * 500_000 + b"TRAILER")
    fd = os.open(path, os.O_RDONLY)
    try:
        message = Message(b"Subject: big\r\n\r\n", FileBody(fd, 7, 2_500_000))
        pieces = list(message.wire())
        assert len(pieces) > 1 and max(map(len, pieces)) <= 2 * (1 << 20)
        assert b"".join(pieces) == b"Subject: big\r\n\r\n" + b"line\r\n" * 500_000
        assert message.size == 16 + 2_500_000 and message.is_ascii()
        assert message.prefix(20) == b"Subject: big\r\n\r\nline"
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(fd)


def test_a_file_that_shrinks_while_sent_fails_instead_of_sending_less(tmp_path: Path) -> None:
    path = tmp_path / "q"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.truncate(path, 50)
        with pytest.raises(OSError, match="changed while read"):
            list(Message(b"", FileBody(fd, 0, 100)).raw())
    finally:
        os.close(fd)


def test_memory_body_prefix() -> None:
    assert Message(b"H: v\r\n\r\n", MemoryBody(b"body")).prefix(100) == b"H: v\r\n\r\nbody"
