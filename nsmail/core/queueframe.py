"""Writing the queue file format (`nsmail.core.queuefile` describes it and reads it).

Apart from the reader for the same reason as `nsmail.submit.maildrop`: the submission command
writes a queue file once per start, and the reader's imports (json, re, dataclasses,
OpenSSL's hashlib) cost a start several times more than writing. So the envelope record
is written as JSON by the few lines below, byte for byte what `json.dumps` writes with
`ensure_ascii=True` and compact separators (a hypothesis test holds them to it), and the
checksum is CPython's built-in SHA-256.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

try:  # built into CPython 3.11; hashlib would load OpenSSL first (3 ms of every start)
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # 3.12 renamed it: hashlib then, a little slower
    from hashlib import sha256

TYPE_CHECKING = False  # typing and collections.abc cost a start more than this module
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    # A JSON value: the envelope record is an object of scalars, lists and objects.
    Field = str | int | float | bool | None | Sequence["Field"] | dict[str, "Field"]

MAGIC = b"NSMAIL-QUEUE 2\n"


def frame(record: dict[str, Field], body: Iterable[bytes]) -> Iterator[bytes]:
    """The queue file for the envelope `record` and the message streamed as `body`."""
    encoded = _value(record).encode("ascii")
    digest = sha256()
    head = b"%senvelope %d\n%s\nbody\n" % (MAGIC, len(encoded), encoded)
    digest.update(head)
    yield head
    for piece in body:
        if piece:
            digest.update(piece)
            yield piece
    yield b"\n"  # before the hash: hashed by a reader like every byte above "end"
    digest.update(b"\n")
    yield b"end %s\n" % digest.hexdigest().encode("ascii")


def _value(value: Field) -> str:
    if isinstance(value, str):
        return _string(value)
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # what json.dumps writes; inf and nan never occur here
    if isinstance(value, dict):
        return "{" + ",".join(f"{_string(k)}:{_value(v)}" for k, v in value.items()) + "}"
    return "[" + ",".join(_value(item) for item in value) + "]"


def _string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return '"' + text.translate(_ESCAPES) + '"'


class _Escapes(dict[int, str]):
    """The str.translate table of JSON's ASCII-only strings: printable ASCII but the quote
    and the backslash stays, the rest becomes \\uXXXX (a surrogate pair above U+FFFF)."""

    def __missing__(self, code: int) -> str:
        if 0x20 <= code < 0x7F:
            raise LookupError  # str.translate leaves the character as it is
        if code < 0x10000:
            escaped = f"\\u{code:04x}"
        else:
            high, low = divmod(code - 0x10000, 0x400)
            escaped = f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"
        self[code] = escaped
        return escaped


_ESCAPES = _Escapes(
    {
        ord('"'): '\\"',
        ord("\\"): "\\\\",
        ord("\b"): "\\b",
        ord("\f"): "\\f",
        ord("\n"): "\\n",
        ord("\r"): "\\r",
        ord("\t"): "\\t",
    }
)
