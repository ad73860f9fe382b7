"""A message on its way out, read in chunks: never held whole in memory, whatever its size.

A `Message` is a header section held in memory (completed by `nsmail.core.headers`, and
signed) followed by the rest of the submitted bytes, which stay in the queue file
(`nsmail.tenant.spool.FileBody`) or, for mail made here such as bounces, in memory
(`MemoryBody`). Agents stream it with `wire`: CRLF line ends, no NUL, no line over 998
octets (RFC 5321 2.3.8 and 4.5.3.1.6, RFC 5322 2.1.1), the same bytes
`nsmail.core.headers.complete` gives for a whole message, so the result does not depend on
where chunks were cut. `dot_stuffed` adds the SMTP DATA transparency of RFC 5321 4.5.2.

Pure: the `Body` that reads a queue file is the spool's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

CHUNK = 1 << 20
# RFC 5322 2.1.1: at most 998 octets per line, excluding the CRLF.
MAX_LINE = 998


class Body(Protocol):
    """Bytes that can be read in pieces: the part of a message kept out of memory."""

    @property
    def length(self) -> int: ...

    def read(self, offset: int, size: int) -> bytes: ...

    def after(self, offset: int) -> Body:
        """What follows the first `offset` bytes."""
        ...


@dataclass(frozen=True, slots=True)
class MemoryBody:
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def after(self, offset: int) -> MemoryBody:
        return MemoryBody(self.data[offset:])


def chunks(body: Body) -> Iterator[bytes]:
    for offset in range(0, body.length, CHUNK):
        yield body.read(offset, CHUNK)


@dataclass(frozen=True, slots=True)
class Message:
    head: bytes  # the header section as sent (CRLF lines, blank line included), or b""
    rest: Body  # everything after `head`, as stored

    @classmethod
    def of(cls, data: bytes) -> Message:
        """A whole message made in memory (a bounce, a test): lines repaired, the header
        section up to the first empty line kept as `head` (all of it, when no empty line
        ends it: a message without a body)."""
        lines = Lines()
        wire = lines.feed(data) + lines.end()
        blank = (b"\r\n" + wire).find(b"\r\n\r\n")
        if blank < 0:
            return cls(wire + b"\r\n", MemoryBody(b""))
        return cls(wire[: blank + 2], MemoryBody(wire[blank + 2 :]))

    @property
    def size(self) -> int:
        """The stored size: an estimate of the size on the wire (RFC 1870 allows one)."""
        return len(self.head) + self.rest.length

    def raw(self) -> Iterator[bytes]:
        """The message as stored, in pieces."""
        if self.head:
            yield self.head
        yield from chunks(self.rest)

    def prefix(self, size: int) -> bytes:
        """At most `size` bytes from the start, as stored."""
        return (self.head + self.rest.read(0, max(0, size - len(self.head))))[:size]

    def wire(self) -> Iterator[bytes]:
        """The message as sent: whole CRLF-terminated lines in each piece."""
        if self.head:
            yield self.head
        yield from self.body_wire()

    def body_wire(self) -> Iterator[bytes]:
        """What follows `head`, as sent."""
        lines = Lines()
        for piece in chunks(self.rest):
            out = lines.feed(piece)
            if out:
                yield out
        last = lines.end()
        if last:
            yield last

    def is_ascii(self) -> bool:
        return all(piece.isascii() for piece in self.raw())


def dot_stuffed(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """RFC 5321 4.5.2: a line starting with "." gets one more; `pieces` hold whole lines."""
    for piece in pieces:
        yield (b"." if piece.startswith(b".") else b"") + piece.replace(b"\n.", b"\n..")


class Lines:
    """Turns bytes fed in any pieces into CRLF lines of at most MAX_LINE octets, no NUL.

    A lone CR or LF ends a line, as CRLF does (RFC 5322 2.3); a longer line is broken at
    the limit, before a UTF-8 character rather than inside it; a last line without an end
    gets one. The carry between pieces holds at most one partial line of MAX_LINE octets.
    """

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, piece: bytes) -> bytes:
        data = self._carry + piece.replace(b"\0", b"")
        # A CR at the very end may be the first half of a CRLF: keep it for the next piece.
        cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
        whole, self._carry = data[:cut], data[cut:]
        out = _normal(whole) if whole else b""
        if len(self._carry) > MAX_LINE + 3:  # enough to choose a boundary (see `boundary`)
            # A CR kept at the end is a line end, not the line's content: it is not counted
            # when the line is broken (or a line of exactly n * MAX_LINE gains an empty one).
            held = b"\r" if self._carry.endswith(b"\r") else b""
            broken = break_line(self._carry.removesuffix(held))
            self._carry = broken.pop() + held
            out += b"".join(line + b"\r\n" for line in broken)
        return out

    def end(self) -> bytes:
        """The last line, which need not have ended."""
        data, self._carry = self._carry, b""
        if not data:
            return b""
        return _normal(data if data.endswith((b"\r", b"\n")) else data + b"\n")


def _normal(whole: bytes) -> bytes:
    """Complete lines (`whole` ends with a line end) with CRLF ends and no long line."""
    # The same as replacing each CRLF, CR or LF with CRLF, at C speed rather than regex speed.
    crlf = whole.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    lines = crlf.split(b"\r\n")[:-1]
    if max(map(len, lines), default=0) <= MAX_LINE:
        return crlf
    return b"".join(piece + b"\r\n" for line in lines for piece in break_line(line))


def break_line(line: bytes) -> list[bytes]:
    """`line` cut into pieces of at most MAX_LINE octets (the last one may be shorter)."""
    pieces = []
    start = 0
    while len(line) - start > MAX_LINE:
        cut = boundary(line, start)
        pieces.append(line[start:cut])
        start = cut
    pieces.append(line[start:])
    return pieces


def boundary(line: bytes, start: int) -> int:
    """Where to cut a line longer than MAX_LINE past `start`: at the limit, or before it at
    the start of a UTF-8 character."""
    limit = start + MAX_LINE
    cut = limit
    # Up to three UTF-8 continuation bytes (10xxxxxx) follow a character's first byte.
    while cut > limit - 3 and 0x80 <= line[cut] < 0xC0:
        cut -= 1
    return cut if not 0x80 <= line[cut] < 0xC0 else limit
