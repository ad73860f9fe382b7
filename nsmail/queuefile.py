"""The queue file format: one message (envelope and body) framed so damage is detectable.

Layout, every header line ASCII and LF-terminated::

    NSMAIL-QUEUE 1
    envelope <n>
    <n bytes of JSON object>
    body <n>
    <n bytes of message>
    end <sha256 hex of every byte above this line>

The envelope is a JSON object so fields can be added without changing the framing (a new
field has a default, so files written before it still decode); `decode` rejects unknown
fields, so a file from a newer writer fails loudly instead of losing data. The version
line is for a change of the framing itself.

Security: `decode` reads tenant-written bytes (the tenant's sendmail writes the spool) and
must only ever raise QueueFileError, whatever the input; sizes are checked against the
data actually present before anything is sliced or parsed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAGIC = b"NSMAIL-QUEUE 1\n"
MAX_ENVELOPE = 1 << 20

_LENGTH_LINE = re.compile(rb"(envelope|body) (0|[1-9][0-9]{0,15})\n")
_END_LINE = re.compile(rb"end ([0-9a-f]{64})\n")
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


def encode(envelope: Envelope, body: bytes) -> bytes:
    """Frame `envelope` and `body` as a queue file."""
    fields = dataclasses.asdict(envelope)
    fields["recipients"] = list(envelope.recipients)
    record = json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    framed = b"".join(
        (
            MAGIC,
            b"envelope %d\n" % len(record),
            record,
            b"\n",
            b"body %d\n" % len(body),
            body,
            b"\n",
        )
    )
    return framed + b"end %s\n" % hashlib.sha256(framed).hexdigest().encode("ascii")


def decode(data: bytes) -> tuple[Envelope, bytes]:
    """Parse a queue file; raises QueueFileError if it is torn, tampered or malformed."""
    if not data.startswith(MAGIC):
        raise QueueFileError("bad magic or unsupported version")
    record, pos = _section(data, len(MAGIC), b"envelope")
    if len(record) > MAX_ENVELOPE:
        raise QueueFileError("envelope too large")
    body, pos = _section(data, pos, b"body")
    end = _END_LINE.fullmatch(data, pos)
    if end is None:
        raise QueueFileError("missing or malformed end marker")
    if hashlib.sha256(data[:pos]).hexdigest().encode("ascii") != end.group(1):
        raise QueueFileError("checksum mismatch")
    return _envelope(record), body


def _section(data: bytes, pos: int, name: bytes) -> tuple[bytes, int]:
    """One `<name> <n>\\n<n bytes>\\n` section at `pos`: its payload and the next position."""
    header = _LENGTH_LINE.match(data, pos)
    if header is None or header.group(1) != name:
        raise QueueFileError(f"malformed {name.decode()} header")
    start = header.end()
    stop = start + int(header.group(2))
    if stop + 1 > len(data) or data[stop : stop + 1] != b"\n":
        raise QueueFileError(f"truncated {name.decode()} section")
    return data[start:stop], stop + 1


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
