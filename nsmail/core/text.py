"""Strings nsmail did not write, made safe to show a person: the one escaper.

What nsmail echoes in a log line, an error, the status table or a listing may come from a
tenant, a remote server, a DNS zone or a command line: a control character in it could
start a forged log line, drive the terminal (escape sequences) or hide what follows. So
each such string is shown through `printable` (one line) or `printable_lines` (message
text); text that goes back onto the SMTP wire or into a header field, where only ASCII may
go, through `wire_text`. `nsmail-sendmail` imports this at every start, so it imports
nothing.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` for one line of a log or a terminal: every character that is not printable
    (controls, line and paragraph separators, unassigned code points: `str.isprintable`)
    written as Python escapes it, e.g. \\n, \\x1b, \\u2028."""
    if text.isprintable():  # nearly always: one pass in C instead of one per character
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def printable_lines(data: bytes) -> str:
    """Message bytes for a terminal, line by line: UTF-8 (anything else as U+FFFD), each
    line `printable` but for its tabs, which indent folded header fields."""
    lines = data.decode("utf-8", "replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    return "".join(
        "\t".join(printable(part) for part in line.removesuffix("\r").split("\t")) + "\n"
        for line in lines
    )


def wire_text(text: str) -> str:
    """`text` for an SMTP reply line or a header field: printable ASCII only (RFC 5321 4.2,
    RFC 5322 2.2), anything else as "?"."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)
