"""Header completion: added fields, kept bytes, line repair, -t, and hostile input."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from datetime import datetime, timedelta, timezone
from email.header import decode_header, make_header
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsmail.core.headers import (
    MAX_HEADER_BYTES,
    MAX_HOPS,
    MAX_LINE,
    Completed,
    Completion,
    HeaderError,
    Trace,
    body_lines,
    complete,
    fold,
    trace,
)

NOW = datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=1)))
BASE = Completion(
    domain="bcd.test",
    local_user="alice",
    full_name=None,
    envelope_sender="alice@bcd.test",
    now=NOW,
    unique="4Xq7Zb",
    extract_recipients=False,
)
KEPT = b"Date: Mon, 04 Mar 2024 10:00:00 +0000\r\nMessage-ID: <x@bcd.test>\r\n"
FULL = KEPT + b"From: alice@bcd.test\r\n"


def run(raw: bytes, **changes: Any) -> Completed:
    return complete(raw, dataclasses.replace(BASE, **changes))


def header_block(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def test_missing_fields_are_added_after_the_existing_ones() -> None:
    result = run(b"Subject: hi\n\nbody\n")
    assert result.message == (
        b"Subject: hi\r\n"
        b"Date: Tue, 05 Mar 2024 14:07:09 +0100\r\n"
        b"From: alice@bcd.test\r\n"
        b"Message-ID: <4Xq7Zb@bcd.test>\r\n"
        b"\r\n"
        b"body\r\n"
    )
    assert result.added == ("Date", "From", "Message-ID")
    assert result.recipients == ()
    assert not result.had_nul


def test_complete_message_is_left_byte_for_byte() -> None:
    raw = (
        b"From: Alice <alice@bcd.test>\r\n"
        b"To: bob@rcpt.test,\r\n\t carol@rcpt.test\r\n"
        b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
        b"X-Odd-Name!#$%&'*+-/=?^_`{|}~: kept\r\n" + KEPT + b"\r\n"
        b"line one\r\n\r\n.\r\n"
    )
    result = run(raw)
    assert result.message == raw
    assert result.added == ()


def test_from_gets_the_full_name() -> None:
    def from_line(name: str) -> bytes:
        message = run(KEPT, full_name=name).message
        return next(line for line in message.split(b"\r\n") if line.startswith(b"From:"))

    assert from_line("Alice Liddell") == b"From: Alice Liddell <alice@bcd.test>"
    assert from_line('Liddell, "Al" \\ A.') == (
        b'From: "Liddell, \\"Al\\" \\\\ A." <alice@bcd.test>'
    )
    assert from_line("  A\r\nBcc: evil@x.test\0 ") == (
        b'From: "A Bcc: evil@x.test" <alice@bcd.test>'
    )
    assert from_line("\r\n") == b"From: alice@bcd.test"
    assert from_line("Ünï") == b"From: =?utf-8?b?w5xuw68=?= <alice@bcd.test>"


def test_long_non_ascii_full_name_is_folded_into_encoded_words() -> None:
    message = run(KEPT, full_name="Ünïcødé " * 300).message
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    name, address = str(parsed["From"]).rsplit(" ", 1)
    # RFC 2047 6.2: the whitespace between adjacent encoded-words is not part of the text.
    assert str(make_header(decode_header(name))) == ("Ünïcødé " * 300).strip()
    assert address == "<alice@bcd.test>"
    assert max(len(line) for line in message.split(b"\r\n")) <= 78 + len(" <alice@bcd.test>")


def test_undecodable_full_name_is_replaced_not_raised() -> None:
    message = run(KEPT, full_name="bad \udcff byte").message
    assert b"\r\nFrom: bad ? byte <alice@bcd.test>\r\n" in message


@pytest.mark.parametrize(
    ("header", "sender", "expected"),
    [
        (b"From: alice@bcd.test", "alice@bcd.test", None),
        (b"From: Alice <Alice@bcd.test>", "alice@bcd.test", None),
        # From is not the envelope sender (a web app's noreply, a bounce address, the
        # login): receivers would show "on behalf of" it, and RFC 5322 wants no Sender.
        (b"From: boss@bcd.test", "alice@bcd.test", None),
        (b"From: Shop <noreply@bcd.test>", "uid61000@bcd.test", None),
        (b"From: <<<", "alice@bcd.test", None),
        (b"From: undisclosed:;", "alice@bcd.test", None),
        (b'From: "Doe, Jane" <jane@bcd.test>', "alice@bcd.test", None),  # a comma, one mailbox
        # RFC 5322 3.6.2: more than one author, so Sender MUST name one mailbox.
        (b"From: a@bcd.test, b@bcd.test", "a@bcd.test", "a@bcd.test"),
        (b"From: a@bcd.test, b@bcd.test", "", "alice@bcd.test"),  # null sender: the submitter
        (b"From: a@bcd.test\r\nFrom: b@bcd.test", "bounces@bcd.test", "bounces@bcd.test"),
        (b"From: a@bcd.test, b@bcd.test\r\nSender: a@bcd.test", "x@bcd.test", None),
    ],
)
def test_sender_only_when_from_has_several_mailboxes(
    header: bytes, sender: str, expected: str | None
) -> None:
    result = run(header + b"\r\n" + KEPT + b"\r\nbody\r\n", envelope_sender=sender)
    assert ("Sender" in result.added) == (expected is not None)
    if expected is not None:
        assert f"\r\nSender: {expected}\r\n".encode() in result.message
    else:
        assert header_block(result.message).lower().count(b"\nsender:") == header.lower().count(
            b"\nsender:"
        )


def test_extract_recipients_collects_to_cc_bcc_and_drops_bcc() -> None:
    raw = (
        b"To: Bob <bob@rcpt.test>, friends: carol@rcpt.test, dave@rcpt.test;\r\n"
        b"cc: erin\r\n"
        b"BCC: frank@rcpt.test,\r\n grace@rcpt.test\r\n"
        b"Subject: s\r\n"
        b"Bcc: bob@rcpt.test\r\n"
        b"Reply-To: ignored@rcpt.test\r\n" + KEPT + b"\r\nbody\r\n"
    )
    result = run(raw, extract_recipients=True)
    assert result.recipients == (
        "bob@rcpt.test",
        "carol@rcpt.test",
        "dave@rcpt.test",
        "erin@bcd.test",
        "frank@rcpt.test",
        "grace@rcpt.test",
    )
    assert b"bcc" not in result.message.lower()
    assert b"grace" not in result.message
    assert result.message.startswith(
        b"To: Bob <bob@rcpt.test>, friends: carol@rcpt.test, dave@rcpt.test;\r\n"
        b"cc: erin\r\nSubject: s\r\nReply-To: ignored@rcpt.test\r\n"
    )


def test_without_extraction_bcc_stays_and_nothing_is_collected() -> None:
    result = run(b"Bcc: frank@rcpt.test\r\n" + KEPT + b"\r\n")
    assert result.recipients == ()
    assert result.message.startswith(b"Bcc: frank@rcpt.test\r\n")


def test_undisclosed_recipients_group_is_fine_but_unreadable_addresses_are_not() -> None:
    assert run(b"To: undisclosed-recipients:;\r\n", extract_recipients=True).recipients == ()
    for bad in (b"To: a@rcpt.test,\r\n", b"Cc: alice@x.test)<bob@y.test>\r\n", b"To: \xff@x\r\n"):
        with pytest.raises(HeaderError, match="malformed address"):
            run(bad, extract_recipients=True)


def test_line_ends_become_crlf() -> None:
    result = run(b"Subject: a\rX-A: b\n" + KEPT + b"\nbody\rmore\r\r\nend")
    assert result.message.startswith(b"Subject: a\r\nX-A: b\r\nDate: ")
    assert result.message.endswith(b"\r\n\r\nbody\r\nmore\r\n\r\nend\r\n")


def test_nul_is_removed_and_reported() -> None:
    result = run(b"Subj\0ect: a\0b\r\n" + FULL + b"\r\nbo\0dy\0\r\n")
    assert result.had_nul
    assert result.message == b"Subject: ab\r\n" + FULL + b"\r\nbody\r\n"


def test_long_body_line_is_broken_at_998_octets() -> None:
    result = run(KEPT + b"\r\n" + b"x" * 2500 + b"\r\nshort\r\n")
    body = result.message.split(b"\r\n\r\n", 1)[1]
    assert body == b"x" * 998 + b"\r\n" + b"x" * 998 + b"\r\n" + b"x" * 504 + b"\r\nshort\r\n"


def test_long_line_is_not_broken_inside_a_utf8_character() -> None:
    line = b"x" * 997 + "é".encode() + b"y"
    assert body_lines(line) == [b"x" * 997, "é".encode() + b"y"]
    assert body_lines(b"\xa9" * 1000) == [b"\xa9" * 998, b"\xa9" * 2]  # not UTF-8: at the limit


def test_long_header_is_folded_at_whitespace_so_unfolding_restores_it() -> None:
    words = b" ".join(b"word%d" % n for n in range(400))
    field = b"Subject: " + words
    lines = fold(field)
    assert len(lines) > 1
    assert all(len(line) <= MAX_LINE for line in lines)
    assert all(line[:1] == b" " for line in lines[1:])
    assert b"".join(lines) == field
    message = run(field + b"\r\n" + KEPT + b"\r\n").message
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Subject"] == words.decode()


def test_long_header_without_whitespace_is_broken_with_a_space() -> None:
    field = b"X-Token: " + b"t" * 2000
    # Folded after the colon first, then broken twice.
    assert fold(field) == [b"X-Token:", b" " + b"t" * 997, b" " + b"t" * 997, b" " + b"t" * 6]
    # Leading whitespace of a continuation line is not a fold point.
    assert fold(b"\t" * 5 + b"u" * 1000)[0] == b"\t" * 5 + b"u" * 993


def test_malformed_header_line_starts_the_body() -> None:
    result = run(b"Subject: a\r\nnot a header\r\nX-B: c\r\n\r\nrest\r\n")
    assert result.message == (
        b"Subject: a\r\n"
        b"Date: Tue, 05 Mar 2024 14:07:09 +0100\r\n"
        b"From: alice@bcd.test\r\n"
        b"Message-ID: <4Xq7Zb@bcd.test>\r\n"
        b"\r\n"
        b"not a header\r\nX-B: c\r\n\r\nrest\r\n"
    )
    for bad_start in (b" folded first\r\n", b"Bad Name: x\r\n", b": x\r\n", b"\xc3\xa9: x\r\n"):
        message = run(bad_start + b"Subject: a\r\n").message
        assert message.endswith(b"\r\n\r\n" + bad_start + b"Subject: a\r\n")


def test_without_an_empty_line_everything_is_headers() -> None:
    result = run(b"Subject: a\r\n b\r\nX-C: d")
    assert result.message.startswith(b"Subject: a\r\n b\r\nX-C: d\r\nDate: ")
    assert result.message.endswith(b"\r\n\r\n")


def test_empty_input_gets_just_the_added_fields() -> None:
    assert run(b"").message == (
        b"Date: Tue, 05 Mar 2024 14:07:09 +0100\r\n"
        b"From: alice@bcd.test\r\n"
        b"Message-ID: <4Xq7Zb@bcd.test>\r\n"
        b"\r\n"
    )


def test_eight_bit_headers_are_kept() -> None:
    raw = "Subject: grüße\r\nTo: jörg@bücher.test\r\n".encode() + FULL + b"\r\n"
    assert run(raw + b"x\r\n").message.startswith(raw)
    latin1 = b"Subject: gr\xfc\xdfe\r\n" + FULL
    assert run(latin1 + b"\r\n").message.startswith(latin1)


def test_header_section_size_is_bounded() -> None:
    with pytest.raises(HeaderError, match="header section"):
        run(b"X-Big: " + b"a" * MAX_HEADER_BYTES)
    with pytest.raises(HeaderError):
        run(b"X-Many: a\r\n" * (MAX_HEADER_BYTES // 11 + 1))
    big_body = run(KEPT + b"\r\n" + b"b" * (2 * MAX_HEADER_BYTES))
    assert len(big_body.message) > 2 * MAX_HEADER_BYTES


@pytest.mark.parametrize(
    "change",
    [
        {"envelope_sender": "a@b.test\r\nBcc: x@y.test"},
        {"local_user": "al\nice"},
        {"domain": "bcd.test\0"},
        {"unique": "q\r"},
        {"local_user": "bad\udcff"},
    ],
)
def test_control_characters_in_identities_are_refused(change: dict[str, str]) -> None:
    with pytest.raises(HeaderError):
        run(b"From: x@y.test\r\n\r\n", **change)


# Pieces that make arbitrary bytes likely to reach every branch of the parser.
fragments = st.one_of(
    st.binary(max_size=20),
    st.sampled_from(
        [
            b"To: ",
            b"Cc:",
            b"bcc: ",
            b"From: ",
            b"Sender:",
            b"Subject: ",
            b"Date: x",
            b"@",
            b"a@b.test",
            b"<",
            b">",
            b",",
            b";",
            b":",
            b'"',
            b"(",
            b")",
            b"\\",
            b" ",
            b"\t",
            b"\r",
            b"\n",
            b"\r\n",
            b"\0",
            b"\xc3",
            b"\xa9",
            b"\xff",
            b"=?utf-8?q?x?=",
        ]
    ),
    st.builds(lambda n, c: c * n, st.integers(990, 2100), st.sampled_from([b"x", b" ", b"\xa9"])),
)
hostile = st.one_of(st.binary(max_size=300), st.lists(fragments, max_size=40).map(b"".join))
completions = st.builds(
    Completion,
    domain=st.just("bcd.test"),
    local_user=st.just("alice"),
    full_name=st.one_of(st.none(), st.text(max_size=200)),
    envelope_sender=st.sampled_from(["", "alice@bcd.test", "a@b.test"]),
    now=st.just(NOW),
    unique=st.just("4Xq7Zb"),
    extract_recipients=st.booleans(),
)


def assert_well_formed(message: bytes) -> None:
    assert b"\0" not in message
    assert message.endswith(b"\r\n")
    lines = message.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert all(len(line) <= MAX_LINE for line in lines)
    assert b"" in lines  # the header/body separator


@settings(max_examples=400, deadline=None)
@given(hostile, completions)
def test_hostile_bytes_give_a_well_formed_message_or_header_error(
    raw: bytes, c: Completion
) -> None:
    try:
        result = complete(raw, c)
    except HeaderError:
        return
    assert_well_formed(result.message)
    if c.extract_recipients:
        assert b"\r\nbcc:" not in header_block(b"\r\n" + result.message).lower()
    # Without -t and Sender (which a From added by the first pass may call for).
    again = complete(
        result.message, dataclasses.replace(c, extract_recipients=False, envelope_sender="")
    )
    assert again.message == result.message
    assert again.added == ()


field_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=20,
).filter(lambda name: name.lower() not in {"bcc", "from", "sender", "date", "message-id"})
field_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200
).map(str.encode)
fields = st.builds(
    lambda name, value, folds: (
        name.encode() + b":" + value + b"".join(b"\r\n\t" + fold_value for fold_value in folds)
    ),
    field_names,
    field_values,
    st.lists(field_values.filter(lambda value: value.strip() != b""), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(fields, max_size=10), st.binary(max_size=200), st.booleans())
def test_valid_headers_survive_byte_identical(
    header_lines: list[bytes], body: bytes, extract: bool
) -> None:
    header = b"".join(line + b"\r\n" for line in header_lines)
    body = body_lines_crlf(body)
    try:
        result = run(header + FULL + b"\r\n" + body, extract_recipients=extract)
    except HeaderError:
        assert extract  # only an unreadable To/Cc may refuse
        return
    assert result.message == header + FULL + b"\r\n" + body
    assert result.added == ()


def body_lines_crlf(body: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in body_lines(body.replace(b"\0", b"")))


def test_the_trace_counts_hops_and_names_who_it_was_delivered_to() -> None:
    head = (
        b"Received: from a\r\n\tby b\r\n"
        b"Delivered-To: Info@BCD.test\r\n"
        b"Subject: Delivered-To: not@this.test\r\n"
        b"\r\n"
        b"Delivered-To: nor@the-body.test\r\n"
    )
    assert trace(head) == Trace(2, frozenset({"info@bcd.test"}))
    assert trace(b"X: " + b"y" * MAX_HEADER_BYTES).hops == MAX_HOPS
