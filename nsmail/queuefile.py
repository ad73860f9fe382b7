"""The queue file format: one message (envelope and body) framed so damage is detectable.

Layout, every header line ASCII and LF-terminated::

    NSMAIL-QUEUE 1
    envelope <n>
    <n bytes of JSON object>
    body <n>
    <n bytes of message>
    end <sha256 hex of every byte above this line>

The envelope is a JSON object so later versions can add fields (attempt counters, arrival
time) without changing the framing; `decode` rejects unknown fields, so a file from a newer
writer fails loudly instead of losing data. `write_durably` is the thin IO shell that puts
an encoded file into the spool.

Security: `decode` reads tenant-written bytes (the tenant's sendmail writes the spool) and
must only ever raise QueueFileError, whatever the input; sizes are checked against the
data actually present before anything is sliced or parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"NSMAIL-QUEUE 1\n"
MAX_ENVELOPE = 1 << 20

# Spool state directories; a message changes state only by rename between them.
TMP = "tmp"
INCOMING = "incoming"
FAILED = "failed"
STATES = (TMP, INCOMING, FAILED)

_LENGTH_LINE = re.compile(rb"(envelope|body) (0|[1-9][0-9]{0,15})\n")
_END_LINE = re.compile(rb"end ([0-9a-f]{64})\n")
_QUEUE_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


class QueueFileError(Exception):
    """The bytes are not a complete, intact queue file."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who a message is from and to (RFC 5321 reverse-path and forward-paths)."""

    sender: str
    recipients: tuple[str, ...]


def encode(envelope: Envelope, body: bytes) -> bytes:
    """Frame `envelope` and `body` as a queue file."""
    record = json.dumps(
        {"sender": envelope.sender, "recipients": list(envelope.recipients)},
        ensure_ascii=True,
        separators=(",", ":"),
    ).encode("ascii")
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
    if not isinstance(fields, dict) or set(fields) != {"sender", "recipients"}:
        raise QueueFileError("envelope fields missing or unknown")
    sender, recipients = fields["sender"], fields["recipients"]
    if not isinstance(sender, str) or not isinstance(recipients, list):
        raise QueueFileError("envelope field of wrong type")
    if not recipients or not all(isinstance(r, str) and r for r in recipients):
        raise QueueFileError("envelope recipients must be non-empty strings")
    return Envelope(sender=sender, recipients=tuple(recipients))


def valid_queue_id(name: str) -> bool:
    """True for names the spool may hold (no path separators, no dot files)."""
    return _QUEUE_ID.fullmatch(name) is not None


def write_durably(spool_root: Path, queue_id: str, data: bytes) -> None:
    """Put `data` into incoming/`queue_id`, replacing any file there, and make it durable.

    Write to tmp/, fsync the file, rename into incoming/, fsync incoming/: once this
    returns the message survives a crash, and a reader never sees a partial file.
    """
    if not valid_queue_id(queue_id):
        raise ValueError(f"bad queue id {queue_id!r}")
    tmp_path = spool_root / TMP / queue_id
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp_path, spool_root / INCOMING / queue_id)
    fsync_directory(spool_root / INCOMING)


def fsync_directory(path: Path) -> None:
    """Make renames into `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
