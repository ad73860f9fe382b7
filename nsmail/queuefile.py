"""The queue file format: one message (envelope and body) framed so damage is detectable.

Layout of version 2 (written now), every framing line ASCII and LF-terminated::

    NSMAIL-QUEUE 2
    envelope <n>
    <n bytes of JSON object>
    body
    <the message, any length>
    end <sha256 hex of every byte above this line, the LF before "end" included>

The body's length is not written before it, so a message is written as it streams in
(sendmail reads it from a pipe) and never has to be held whole in memory; the trailer is
found from the end of the file. Version 1 (the first release) wrote `body <n>` instead of
`body`, and is still read: a queue left by it delivers after an upgrade. Both versions
end with the same trailer.

The envelope is a JSON object so fields can be added without changing the framing (a new
field has a default, so files written before it still decode); unknown fields are
rejected, so a file from a newer writer fails loudly instead of losing data. The version
line is for a change of the framing itself.

Pure: `frame` encodes from chunks, `parse` reads the framing from the first and last bytes
and the size of a file, and the caller streams the checked range through a hash
(`Layout.checked`); `decode` does it all for bytes in memory. The writing itself is
`nsmail.queueframe`'s, which the submission command imports without this module.

Security: the parsers read tenant-written bytes (the tenant's sendmail writes the spool)
and must only ever raise QueueFileError, whatever the input; sizes are checked against
the data actually present before anything is sliced or parsed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from nsmail import queueframe
from nsmail.queueframe import MAGIC

MAGIC_V1 = b"NSMAIL-QUEUE 1\n"
MAX_ENVELOPE = 1 << 20
# Enough of a file's start to hold its framing head: magic, envelope line, envelope, body line.
HEAD_BYTES = MAX_ENVELOPE + 64
TRAILER_BYTES = len(b"\nend \n") + 64

_ENVELOPE_LINE = re.compile(rb"envelope (0|[1-9][0-9]{0,15})\n")
_BODY_LINE = re.compile(rb"body\n")
_BODY_LINE_V1 = re.compile(rb"body (0|[1-9][0-9]{0,15})\n")
_TRAILER = re.compile(rb"\nend ([0-9a-f]{64})\n")
_QUEUE_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


class QueueFileError(Exception):
    """The bytes are not a complete, intact queue file."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who a message is from and to (RFC 5321 reverse-path and forward-paths), and its
    history in the queue."""

    sender: str  # "" is the null sender (bounces)
    recipients: tuple[str, ...]  # those still to be delivered
    arrival: float = 0.0  # when the message was accepted, seconds since the epoch
    attempts: int = 0
    warned: bool = False  # a delay warning went to the sender
    submitter: str = ""  # login name of the user who submitted it, for a missing From
    full_name: str = ""  # sendmail -F, for a missing From
    extract: bool = False  # sendmail -t: recipients come from the headers at clean-up
    cleaned: bool = False  # headers completed (nsmail.headers), ready for delivery


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things are in a queue file of `size` bytes, once its framing has parsed."""

    envelope: Envelope
    body_start: int
    body_length: int
    checked: int  # the checksum covers bytes [0, checked)
    digest: bytes  # the sha256 the trailer states, raw

    def verify(self, hashed: bytes) -> None:
        """Raise QueueFileError unless `hashed` (sha256 of the checked range) matches."""
        if hashed != self.digest:
            raise QueueFileError("checksum mismatch")


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "sender": (str,),
    "recipients": (list,),
    "arrival": (int, float),
    "attempts": (int,),
    "warned": (bool,),
    "submitter": (str,),
    "full_name": (str,),
    "extract": (bool,),
    "cleaned": (bool,),
}


def frame(envelope: Envelope, body: Iterable[bytes]) -> Iterator[bytes]:
    """The queue file for `envelope` and the message streamed as `body`, in pieces."""
    fields = dataclasses.asdict(envelope)
    fields["recipients"] = list(envelope.recipients)
    return queueframe.frame(fields, body)


def encode(envelope: Envelope, body: bytes) -> bytes:
    """Frame `envelope` and `body` as a queue file, in memory."""
    return b"".join(frame(envelope, (body,)))


def parse(head: bytes, tail: bytes, size: int) -> Layout:
    """The framing of a file of `size` bytes from its first bytes (`head`, at least
    min(size, HEAD_BYTES) of them) and its last TRAILER_BYTES (`tail`)."""
    if head.startswith(MAGIC):
        version, body_line = 2, _BODY_LINE
    elif head.startswith(MAGIC_V1):
        version, body_line = 1, _BODY_LINE_V1
    else:
        raise QueueFileError("bad magic or unsupported version")
    trailer = _TRAILER.fullmatch(tail) if size >= TRAILER_BYTES else None
    if trailer is None:
        raise QueueFileError("missing or malformed end marker")
    found = _ENVELOPE_LINE.match(head, len(MAGIC))
    if found is None:
        raise QueueFileError("malformed envelope header")
    start, length = found.end(), int(found.group(1))
    if length > MAX_ENVELOPE:
        raise QueueFileError("envelope too large")
    stop = start + length
    if head[stop : stop + 1] != b"\n":
        raise QueueFileError("truncated envelope section")
    body = body_line.match(head, stop + 1)
    if body is None:
        raise QueueFileError("malformed body header")
    body_start = body.end()
    body_length = size - TRAILER_BYTES - body_start
    if body_length < 0 or (version == 1 and int(body.group(1)) != body_length):
        raise QueueFileError("truncated body section")
    return Layout(
        envelope=_envelope(head[start:stop]),
        body_start=body_start,
        body_length=body_length,
        checked=size - TRAILER_BYTES + 1,
        digest=bytes.fromhex(trailer.group(1).decode("ascii")),
    )


def decode(data: bytes) -> tuple[Envelope, bytes]:
    """Parse a queue file held in memory; raises QueueFileError if it is torn, tampered
    or malformed."""
    layout = parse(data[:HEAD_BYTES], data[-TRAILER_BYTES:], len(data))
    layout.verify(hashlib.sha256(memoryview(data)[: layout.checked]).digest())
    return layout.envelope, data[layout.body_start : layout.body_start + layout.body_length]


def _envelope(record: bytes) -> Envelope:
    try:
        fields = json.loads(record.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QueueFileError(f"envelope is not JSON: {e}") from None
    if not isinstance(fields, dict) or not {"sender", "recipients"} <= set(fields):
        raise QueueFileError("envelope fields missing")
    for name, value in fields.items():
        _check_field(name, value)
    recipients = fields["recipients"]
    if not all(isinstance(r, str) and r for r in recipients):
        raise QueueFileError("envelope recipients must be non-empty strings")
    envelope = Envelope(**{**fields, "recipients": tuple(recipients)})
    if not recipients and not (envelope.extract and not envelope.cleaned):
        raise QueueFileError("envelope has no recipients")
    if not math.isfinite(envelope.arrival) or envelope.attempts < 0:
        raise QueueFileError("envelope arrival or attempts out of range")
    return envelope


def _check_field(name: str, value: Any) -> None:
    kinds = _FIELD_TYPES.get(name)
    if kinds is None:
        raise QueueFileError(f"unknown envelope field {name!r}")
    # bool is an int to Python; only "warned"-like fields may hold one.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise QueueFileError(f"envelope field {name!r} has the wrong type")


def valid_queue_id(name: str) -> bool:
    """True for names the spool may hold (no path separators, no dot files)."""
    return _QUEUE_ID.fullmatch(name) is not None
