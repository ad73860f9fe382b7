"""The mbox format of /var/mail: one message appended as `mail`, `mutt` and Debian's MTAs
expect it (mbox(5), as Postfix's local(8) writes it).

An entry is a "From " line (the envelope sender, MAILER-DAEMON for the null one, and the
delivery time in asctime(3) form), the message with LF line ends and a ">" before every
line that starts with "From " (the mboxo quoting Postfix uses, which readers of the other
variants read too), and an empty line. Pure: the time is passed in, the message streamed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from nsmail.core.message import Lines


def entry(sender: str, delivered: datetime, pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The mbox entry of the message streamed as `pieces` (any line ends, cut anywhere)."""
    yield from_line(sender, delivered)
    lines = Lines()  # whole lines, the last one ended too
    for piece in pieces:
        yield _quoted(lines.feed(piece))
    yield _quoted(lines.end())
    yield b"\n"  # the empty line that ends an entry


def from_line(sender: str, delivered: datetime) -> bytes:
    """`From sender Tue Jun  4 10:00:00 2024`: the sender with no white space or control
    characters in it (readers split the line at spaces)."""
    who = "".join("_" if c.isspace() or not c.isprintable() else c for c in sender)
    return f"From {who or 'MAILER-DAEMON'} {delivered.strftime('%a %b %e %H:%M:%S %Y')}\n".encode(
        errors="replace"
    )


def _quoted(crlf_lines: bytes) -> bytes:
    """Whole CRLF lines with LF ends, a ">" before each that starts with "From "."""
    text = b"\n" + crlf_lines.replace(b"\r\n", b"\n")
    return text.replace(b"\nFrom ", b"\n>From ")[1:]
