"""SMTP replies, read with bounds, and failures: their words and their classification."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nsmail.core.smtp.reply import (
    MAX_LINE,
    MAX_LINES,
    MAX_REPLY,
    Enhanced,
    Failure,
    Kind,
    Malformed,
    Reply,
    ReplyReader,
    Stage,
    dropped,
    refusal,
    refused,
    timed_out,
    tls_failed,
    unsendable,
    violation,
)


def read(data: bytes) -> list[Reply]:
    reader = ReplyReader()
    reader.feed(data)
    replies = []
    while (reply := reader.next()) is not None:
        replies.append(reply)
    return replies


def reply(data: bytes) -> Reply:
    [only] = read(data)
    return only


def test_a_multi_line_reply_with_its_enhanced_code() -> None:
    got = reply(b"550-5.7.1 [2001:db8::70] Our system has detected\r\n550 5.7.1 IPv6 rules\r\n")
    assert got.code == 550
    assert got.enhanced == Enhanced(5, 7, 1)
    assert got.lines == ("5.7.1 [2001:db8::70] Our system has detected", "5.7.1 IPv6 rules")
    # The enhanced code each continuation line repeats is said once.
    assert got.words == "550 5.7.1 [2001:db8::70] Our system has detected IPv6 rules"


@pytest.mark.parametrize(
    ("data", "enhanced"),
    [
        (b"250 2.1.5 ok\r\n", Enhanced(2, 1, 5)),
        (b"421 4.7.28 rate limited\r\n", Enhanced(4, 7, 28)),
        (b"451 4.7.500 Server busy\r\n", Enhanced(4, 7, 500)),
        (b"550 4.1.1 wrong class\r\n", None),  # RFC 3463 2: the class is the reply's
        (b"550 5.1.1234 too long\r\n", None),
        (b"550 5.1.1no space\r\n", None),
        (b"250 ok\r\n", None),
        (b"250\r\n", None),
        (b"554 5.7.1\r\n", Enhanced(5, 7, 1)),
    ],
)
def test_enhanced_codes_are_parsed_where_the_reply_is_read(
    data: bytes, enhanced: Enhanced | None
) -> None:
    assert reply(data).enhanced == enhanced


def test_replies_in_pieces_and_several_at_once() -> None:
    reader = ReplyReader()
    for byte in b"250-mx\r\n250 PIPELINING\r\n354 go":
        reader.feed(bytes([byte]))
    assert reader.next() == Reply(250, ("mx", "PIPELINING"), None)
    assert reader.next() is None and reader.pending  # "354 go" has no line end yet
    reader.feed(b"\n")  # a bare LF ends a line, as for smtplib and Postfix
    assert reader.next() == Reply(354, ("go",), None)
    assert not reader.pending


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"250-ok\r\n550 no\r\n", "different codes"),  # RFC 5321 4.2.1
        (b"hello, this is not an SMTP greeting\r\n", "malformed"),
        (b"2x0 ok\r\n", "malformed"),
        (b"250ok\r\n", "malformed"),
        (b" 250 ok\r\n", "malformed"),
        (b"600 ok\r\n", "malformed"),
        (b"250 a\rb\r\n", "malformed"),
        (b"250 " + b"x" * MAX_LINE + b"\r\n", "longer than"),
        (b"250 " + b"x" * MAX_LINE, "longer than"),  # caught before any line end
        (b"250-more\r\n" * MAX_LINES, "more than"),  # caught before the reply ends
        (b"250-" + b"y" * 8000 + b"\r\n" * 1, ""),  # within the bounds: no error
    ],
)
def test_broken_replies_are_malformed(data: bytes, why: str) -> None:
    reader = ReplyReader()
    if not why:
        reader.feed(data)
        return
    with pytest.raises(Malformed, match=why):
        reader.feed(data)
    with pytest.raises(Malformed):  # and stay so: nothing after it can be trusted
        reader.feed(b"250 ok\r\n")


def test_a_reply_is_bounded_in_all() -> None:
    reader = ReplyReader()
    line = b"250-" + b"z" * 1000 + b"\r\n"
    with pytest.raises(Malformed, match=f"longer than {MAX_REPLY}"):
        for _ in range(MAX_REPLY // len(line) + 1):
            reader.feed(line)


# --- fuzzing the reader against a plain reference ---------------------------------------

# RFC 5321 4.2, as the fuzzers' oracle (scripted_smtp) reads it: a code, then "-", SP or nothing.
_STRICT_LINE = re.compile(rb"([2-5][0-9][0-9])([- ][^\r\n]*)?")


def reference(data: bytes) -> list[tuple[int, int]] | None:
    """(code, line count) of each complete reply in `data`, or None if any line is broken.

    Bytes after the last line end are an unfinished reply: not counted, not judged."""
    lines = re.split(rb"(?<=\n)", data)
    replies: list[tuple[int, int]] = []
    current: list[int] = []
    for line in lines:
        if not line.endswith(b"\n"):
            break
        body = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        match = _STRICT_LINE.fullmatch(body)
        if match is None or len(line) > MAX_LINE or (current and int(match[1]) != current[0]):
            return None
        current.append(int(match[1]))
        if line[3:4] != b"-":
            replies.append((current[0], len(current)))
            current = []
    return replies


LINES = st.one_of(
    st.sampled_from([b"250-ok", b"250 ok", b"250", b"550 5.1.1 no", b"550-x", b"2x0 ok", b""]),
    st.tuples(
        st.sampled_from([b"220", b"250", b"354", b"421", b"550", b"199"]), st.binary(max_size=20)
    ).map(lambda t: t[0] + b" " + t[1].replace(b"\n", b"")),
).flatmap(lambda line: st.sampled_from([line + b"\r\n", line + b"\n", line]))


@settings(max_examples=500, deadline=None)
@given(st.lists(LINES, max_size=8), st.lists(st.integers(0, 200), max_size=6))
@example([b"250-a\r\n", b"250 b\r\n"], [3, 9])
@example([b"250-a\r\n", b"550 b\r\n"], [])
def test_the_reader_agrees_with_the_reference_however_the_bytes_are_cut(
    lines: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(lines)
    expected = reference(data)
    reader = ReplyReader()
    got: list[tuple[int, int]] = []
    start = 0
    try:
        for cut in [*sorted(cuts), len(data)]:
            reader.feed(data[start:cut])
            start = max(start, cut)
            while (one := reader.next()) is not None:
                got.append((one.code, len(one.lines)))
    except Malformed:
        assert expected is None, (data, got)
        return
    assert got == expected, data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_replies_or_malformed_never_another_error(data: bytes) -> None:
    try:
        for one in read(data):
            assert 200 <= one.code <= 599 and 1 <= len(one.lines) <= MAX_LINES
            assert isinstance(one.words, str)
    except Malformed:
        pass


# --- failures: words and classification -------------------------------------------------


def test_words_a_person_reads() -> None:
    assert refused("connection refused").words == "connection refused"
    assert timed_out(Stage.GREETING, 300).words == "timed out after 300 s waiting for the greeting"
    assert timed_out(Stage.MESSAGE, 180).words == "timed out after 180 s sending the message"
    assert (
        timed_out(Stage.DOT, 0.5).words
        == "timed out after 0.5 s waiting for the reply to the end of the message"
    )
    assert (
        dropped(Stage.MAIL, "connection closed by the server").words
        == "connection closed by the server while waiting for the reply to MAIL FROM"
    )
    assert (
        dropped(Stage.IDLE, "connection reset by the server").words
        == "connection reset by the server while the session was idle"
    )
    assert (
        violation(Stage.DATA, "'250 ok' in reply to DATA").words
        == "protocol violation while waiting for the reply to DATA: '250 ok' in reply to DATA"
    )
    no = reply(b"550 5.1.1 no such user\r\n")
    assert refusal(Stage.RCPT, no).words == "550 5.1.1 no such user (in reply to RCPT TO)"
    bye = reply(b"554 no SMTP service here\r\n")
    assert refusal(Stage.GREETING, bye).words == "554 no SMTP service here (as its greeting)"
    tls = tls_failed(Stage.TLS, "TLS handshake failed: certificate verify failed: expired")
    assert tls.words == "TLS handshake failed: certificate verify failed: expired"


def test_permanence_and_enhanced_codes() -> None:
    assert refusal(Stage.RCPT, reply(b"550 no\r\n")).permanent
    assert refusal(Stage.RCPT, reply(b"550 no\r\n")).enhanced == Enhanced(5, 0, 0)  # RFC 3463
    assert not refusal(Stage.RCPT, reply(b"451 4.3.0 later\r\n")).permanent
    assert not timed_out(Stage.DOT, 600).permanent
    assert timed_out(Stage.CONNECT, 30).enhanced == Enhanced(4, 4, 1)
    assert dropped(Stage.DOT, "closed").enhanced == Enhanced(4, 4, 2)
    assert unsendable(Stage.MAIL, Enhanced(5, 3, 4), "too big").permanent


def at(stage: Stage, data: bytes) -> Failure:
    return refusal(stage, reply(data))


@pytest.mark.parametrize(
    ("failure", "slow"),
    [
        (at(Stage.MAIL, b"421 4.7.0 Try again later, closing connection.\r\n"), True),
        (at(Stage.GREETING, b"421 mx.test busy\r\n"), True),
        (at(Stage.RCPT, b"450-4.7.28 [198.51.100.70] rate limited\r\n450 4.7.28 gsmtp\r\n"), True),
        (at(Stage.DOT, b"451 4.7.500 Server busy. Please try again later\r\n"), True),
        (at(Stage.MAIL, b"451 4.7.650 temporarily rate limited due to IP reputation\r\n"), True),
        (
            at(
                Stage.RCPT,
                b"450 4.2.1 The user you are trying to contact is receiving mail too quickly\r\n",
            ),
            False,
        ),
        (at(Stage.RCPT, b"452 4.5.3 Your message has too many recipients\r\n"), False),
        (at(Stage.RCPT, b"550 5.7.28 permanent\r\n"), False),
        (at(Stage.RCPT, b"451 4.7.1 greylisted\r\n"), False),
        (timed_out(Stage.MAIL, 300), False),
    ],
)
def test_slow_down(failure: Failure, slow: bool) -> None:
    assert failure.slow_down is slow


@pytest.mark.parametrize(
    ("failure", "level"),
    [
        (refused("connection refused"), True),
        (timed_out(Stage.GREETING, 300), True),
        (timed_out(Stage.DOT, 600), True),
        (dropped(Stage.DATA, "connection reset by the server"), True),
        (violation(Stage.EHLO, "malformed reply line"), True),
        (at(Stage.GREETING, b"554 no SMTP service here\r\n"), True),
        (at(Stage.EHLO, b"421 shutting down\r\n"), True),
        (at(Stage.MAIL, b"421 4.3.2 shutting down\r\n"), False),
        (at(Stage.RCPT, b"550 5.1.1 no such user\r\n"), False),
        (tls_failed(Stage.TLS, "TLS handshake failed: wrong version number"), False),
        (unsendable(Stage.MAIL, Enhanced(5, 3, 4), "too big"), False),
    ],
)
def test_connection_level(failure: Failure, level: bool) -> None:
    assert failure.connection_level is level


GMAIL_IPV6 = (
    b"550-5.7.1 [2001:db8:51::70] Our system has detected that this message does\r\n"
    b"550-5.7.1 not meet IPv6 sending guidelines regarding PTR records and\r\n"
    b"550 5.7.1 authentication. - gsmtp\r\n"
)


@pytest.mark.parametrize(
    ("failure", "other"),
    [
        (at(Stage.DOT, GMAIL_IPV6), True),  # Gmail sends it after the final dot
        (at(Stage.RCPT, b"550 5.7.25 Client host rejected: cannot find your hostname\r\n"), True),
        (at(Stage.MAIL, b"550 5.7.23 SPF validation failed\r\n"), True),
        (at(Stage.GREETING, b"554 no SMTP service here\r\n"), True),
        (at(Stage.GREETING, b"554 5.7.1 listed at a blocklist\r\n"), True),
        (at(Stage.EHLO, b"550 5.7.1 client address rejected\r\n"), True),
        (at(Stage.EHLO, b"501 5.5.4 syntax\r\n"), False),
        (at(Stage.MAIL, b"550 5.7.1 Sender address rejected: Access denied\r\n"), False),
        (at(Stage.RCPT, b"550 5.1.1 no such user\r\n"), False),
        (at(Stage.DOT, b"554 5.7.1 spam\r\n"), False),
        (at(Stage.RCPT, b"450 4.7.25 Client host rejected: cannot find your hostname\r\n"), False),
        (refused("connection refused"), False),
    ],
)
def test_the_other_address_family_may_help(failure: Failure, other: bool) -> None:
    assert failure.other_family_may_help is other


def test_failures_are_values() -> None:
    failure = timed_out(Stage.RCPT, 300)
    assert failure == timed_out(Stage.RCPT, 300) and failure.kind is Kind.TIMEOUT
    with pytest.raises(AttributeError):
        failure.permanent = True  # type: ignore[misc]
