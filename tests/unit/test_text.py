"""nsmail.core.text: the one escaper, for one line and for message text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nsmail.core.text import printable, printable_lines, wire_text


def test_printable_escapes_what_could_forge_a_line_or_drive_a_terminal() -> None:
    assert printable("bob@bcd.test") == "bob@bcd.test"
    assert printable("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert printable("\x1b[2J\x07\x00\x7f") == "\\x1b[2J\\x07\\x00\\x7f"
    # Unicode's own line ends and invisible controls too; printable letters stay as they are.
    assert printable("ü\u2028\u202e\x85") == "ü\\u2028\\u202e\\x85"


@given(st.text())
def test_printable_is_one_printable_line(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable() and "\n" not in shown
    assert printable(shown) == shown


def test_printable_lines_keeps_lines_and_tabs() -> None:
    shown = printable_lines(b"Subject: \x1b]0;pwned\x07\r\n\tfolded\n\xff\n")
    assert shown == "Subject: \\x1b]0;pwned\\x07\n\tfolded\n\ufffd\n"
    assert printable_lines(b"no end") == "no end\n"
    assert printable_lines(b"") == ""


@given(st.binary())
def test_printable_lines_are_printable_but_for_tabs(data: bytes) -> None:
    for line in printable_lines(data).splitlines():
        assert line.replace("\t", " ").isprintable()


def test_wire_text_is_printable_ascii_only() -> None:
    assert wire_text("HELO bücher\r\n\x1b[2J.test") == "HELO b?cher???[2J.test"
    assert wire_text("plain 250 ok") == "plain 250 ok"
