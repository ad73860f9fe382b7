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
line is for a change of the framing itself. A deferred message's envelope carries, per
recipient still waiting, the outcome of its last attempt (`Deferral`), for the queue tools
to say why it waits.

Pure: `frame` encodes from chunks, `parse` reads the framing from the first and last bytes
and the size of a file, and the caller streams the checked range through a hash
(`Layout.checked`); `decode` does it all for bytes in memory. The writing itself is
`nsmail.core.queueframe`'s, which the submission command imports without this module.

Security: the parsers read tenant-written bytes (the tenant's sendmail writes the spool)
and must only ever raise QueueFileError, whatever the input; sizes are checked against
the data actually present before anything is sliced or parsed. Deferrals are bounded
(one per recipient at most, each text and relay cut short) because the queue tools print
them; their text, like every tenant-written string, is still escaped where it is shown.
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

from nsmail.core import queueframe
from nsmail.core.queueframe import MAGIC

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
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")  # RFC 3463 2: class.subject.detail
# A deferral's text: a reply line's worth (RFC 5321 4.5.3.1.5: 512 octets with its code).
MAX_DEFERRAL_TEXT = 500
MAX_RELAY = 320  # host[address]:port, a host name being at most 255 octets (RFC 1035)


class QueueFileError(Exception):
    """The bytes are not a complete, intact queue file."""


@dataclass(frozen=True, slots=True)
class Deferral:
    """Why a recipient still waits: the outcome of its last attempt (postqueue's
    delay_reason)."""

    recipient: str
    status: str  # RFC 3463 enhanced status code, e.g. "4.7.1"
    text: str  # the reply's text, or nsmail's own words when no server replied
    code: int | None = None  # the server's reply code; None: no reply (nsmail decided)
    relay: str = ""  # host[address]:port of the server, "" when none was reached
    at: float = 0.0  # when, seconds since the epoch

    @classmethod
    def bounded(
        cls, recipient: str, status: str, text: str, code: int | None, relay: str, at: float
    ) -> Deferral:
        """A deferral cut to what `decode` accepts (reply text can be 100 lines long)."""
        return cls(recipient, status, text[:MAX_DEFERRAL_TEXT], code, relay[:MAX_RELAY], at)

    @property
    def reason(self) -> str:
        """In words: what the server said, or nsmail's own words when it said nothing."""
        return self.text if self.code is None else f"{self.relay} said: {self.code} {self.text}"


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
    cleaned: bool = False  # headers completed (nsmail.core.headers), ready for delivery
    deferrals: tuple[Deferral, ...] = ()  # of recipients still to be delivered, if deferred


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
    "deferrals": (list,),
}


def frame(envelope: Envelope, body: Iterable[bytes]) -> Iterator[bytes]:
    """The queue file for `envelope` and the message streamed as `body`, in pieces.

    The deferrals are left out if they would make the envelope larger than `parse` takes:
    they only say why mail waits, and a message with thousands of recipients must still
    be readable.
    """
    fields = dataclasses.asdict(envelope)
    if envelope.deferrals and len(json.dumps(fields, separators=(",", ":"))) > MAX_ENVELOPE:
        fields["deferrals"] = []
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
    return envelope_of(fields)


def envelope_of(fields: Any) -> Envelope:
    """The envelope of a decoded JSON record (as `frame` writes it), checked as `parse`
    checks it; raises QueueFileError."""
    if not isinstance(fields, dict) or not {"sender", "recipients"} <= set(fields):
        raise QueueFileError("envelope fields missing")
    for name, value in fields.items():
        _check_field(name, value)
    recipients = fields["recipients"]
    if not all(isinstance(r, str) and r for r in recipients):
        raise QueueFileError("envelope recipients must be non-empty strings")
    deferrals = _deferrals(fields.get("deferrals", []), recipients)
    envelope = Envelope(**{**fields, "recipients": tuple(recipients), "deferrals": deferrals})
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


def _deferrals(records: list[Any], recipients: list[str]) -> tuple[Deferral, ...]:
    if len(records) > len(recipients):
        raise QueueFileError("more deferrals than recipients")
    return tuple(_deferral(record, recipients) for record in records)


def _deferral(record: Any, recipients: list[str]) -> Deferral:
    if not isinstance(record, dict) or not {"recipient", "status", "text"} <= set(record):
        raise QueueFileError("deferral fields missing")
    if not set(record) <= set(Deferral.__dataclass_fields__):
        raise QueueFileError("unknown deferral field")
    deferral = Deferral(**record)
    code, at = deferral.code, deferral.at
    if (
        deferral.recipient not in recipients
        or not isinstance(deferral.status, str)
        or not _STATUS.fullmatch(deferral.status)
        or not isinstance(deferral.text, str)
        or len(deferral.text) > MAX_DEFERRAL_TEXT
        or not isinstance(deferral.relay, str)
        or len(deferral.relay) > MAX_RELAY
        or not (code is None or (type(code) is int and 200 <= code <= 599))
        or not (type(at) in (int, float) and math.isfinite(at))
    ):
        raise QueueFileError("malformed deferral")
    return deferral


def valid_queue_id(name: str) -> bool:
    """True for names the spool may hold (no path separators, no dot files)."""
    return _QUEUE_ID.fullmatch(name) is not None
