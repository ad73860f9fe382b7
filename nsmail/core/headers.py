"""Header completion at queue pick-up: what Postfix's cleanup does to a submitted message.

`complete` turns the bytes a tenant handed to sendmail into a message fit for SMTP DATA:
CRLF line ends, no NUL, no line over 998 octets (RFC 5322 2.1.1, 2.3), and the Date,
Message-ID and From fields RFC 5322 3.6 requires, added when missing. Header fields that
are already valid are kept byte for byte, folding included: nothing here re-encodes or
re-folds what the tenant wrote, except to split a line that is too long.

Choices where the RFCs leave room, each as Postfix or sendmail would do:
- NUL bytes are removed everywhere (sendmail refuses them, Postfix's cleanup drops them);
  `Completed.had_nul` says so, for the log.
- A body line over 998 octets is broken with CRLF at the limit. That changes the content
  (the receiver sees two lines) but beats rejecting the message; Postfix does the same at
  its line_length_limit.
- A header line over 998 octets is folded before whitespace where the field has some
  (unfolding restores it exactly), else broken with CRLF SP, which adds one space.
- A line that is not a header field where one is expected ends the header section; the
  body starts there and the blank line that separates them is inserted.
- An unqualified address in To/Cc/Bcc (`-t`) gets the tenant's domain, as Postfix's
  append_at_myorigin does.
- Sender is added only where RFC 5322 3.6.2 requires it, when From names more than one
  mailbox: not merely because From differs from the envelope sender, which receivers
  would show as "on behalf of" the login or the bounce address (Postfix adds none).

Security: runs as the tenant on tenant-written bytes. `complete` raises nothing but
HeaderError, whatever `raw` holds; the header section is bounded by MAX_HEADER_BYTES.
The `Completion` fields come from the tenant's configuration and the submitting process,
except `full_name` (sendmail -F), which is stripped of control characters; any other
field holding CR, LF or NUL is refused rather than written into a header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, getaddresses

from nsmail.core.addresses import with_domain
from nsmail.core.message import MAX_LINE, boundary, break_line

MAX_HEADER_BYTES = 1 << 20
# RFC 5321 6.3: a message that went through this many hops is in a loop ("at least 100").
MAX_HOPS = 100

_LINE_END = re.compile(rb"\r\n|\r|\n")
# RFC 5322 2.2: field-name = 1*ftext, printable US-ASCII except colon.
# The name and colon must fit on the first line: a field name cannot be folded.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,%d}:" % (MAX_LINE - 1))
_WSP = b" \t"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5322 3.2.3: a display name with any of these must be a quoted-string.
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
_RECIPIENT_FIELDS = frozenset({b"to", b"cc", b"bcc"})


class HeaderError(ValueError):
    """The message cannot be completed (the submission command exits EX_DATAERR)."""


@dataclass(frozen=True, slots=True)
class Completion:
    """Who submitted the message, and when: everything `complete` needs besides the bytes."""

    domain: str
    local_user: str
    full_name: str | None
    envelope_sender: str  # "" for the null sender
    now: datetime  # aware, for Date
    unique: str  # unique left-hand side for Message-ID, e.g. the queue id
    extract_recipients: bool  # sendmail -t


@dataclass(frozen=True, slots=True)
class Completed:
    """The message ready for SMTP DATA (CRLF line ends, not dot-stuffed)."""

    message: bytes
    recipients: tuple[str, ...]  # from To/Cc/Bcc with `extract_recipients`, else empty
    added: tuple[str, ...]  # names of the fields added, in order
    had_nul: bool  # NUL bytes were removed


def complete(raw: bytes, c: Completion) -> Completed:
    """Complete the header of `raw` as described in the module docstring."""
    _check(c)
    had_nul = b"\0" in raw
    fields, body = _split(_lines(raw.replace(b"\0", b"")))
    names = {_name(field[0]).lower() for field in fields}
    recipients: tuple[str, ...] = ()
    if c.extract_recipients:
        recipients = _recipients(fields, c.domain)
        fields = [field for field in fields if _name(field[0]).lower() != b"bcc"]
    added: list[tuple[str, str]] = []
    if b"date" not in names:
        # RFC 5322 3.3 date-time.
        added.append(("Date", format_datetime(c.now)))
    if b"from" not in names:
        added.append(("From", _mailbox(c.full_name, f"{c.local_user}@{c.domain}")))
    elif b"sender" not in names and _several_authors(fields):
        # RFC 5322 3.6.2: several authors, so Sender MUST name the one mailbox responsible
        # for sending; the bounce address, else the submitter's own.
        added.append(("Sender", c.envelope_sender or f"{c.local_user}@{c.domain}"))
    if b"message-id" not in names:
        # RFC 5322 3.6.4: msg-id = "<" id-left "@" id-right ">".
        added.append(("Message-ID", f"<{c.unique}@{c.domain}>"))
    out = [line for field in fields for raw_line in field for line in fold(raw_line)]
    for name, value in added:
        out.extend(_added_field(name, value))
    out.append(b"")
    out.extend(body)
    return Completed(
        message=b"".join(line + b"\r\n" for line in out),
        recipients=recipients,
        added=tuple(name for name, _ in added),
        had_nul=had_nul,
    )


def header_length(raw: bytes) -> int:
    """How many bytes at the start of `raw` are its header section as `complete` sees it,
    the blank line that ends it included: `complete(raw[:n])` is the completed header
    section and `raw[n:]` the body, unchanged, so the body can stay on disk."""
    if b"\0" not in raw:
        return _header_length(raw)
    # `complete` drops NULs before it finds line ends, so CR NUL LF is one line end: find
    # them the same way, then count the NULs back in.
    kept = [i for i, byte in enumerate(raw) if byte]
    length = _header_length(raw.replace(b"\0", b""))
    return kept[length] if length < len(kept) else len(raw)


def _header_length(raw: bytes) -> int:
    start = 0
    for end in _LINE_END.finditer(raw):
        line = raw[start : end.start()]
        if line == b"":
            return end.end()
        if not (line[:1] in (b" ", b"\t") and start) and not _FIELD.match(line):
            return start
        start = end.end()
    return len(raw)


@dataclass(frozen=True, slots=True)
class Trace:
    """Where a message has been, as its header section tells."""

    hops: int  # Received and Delivered-To fields (RFC 5321 6.3; Postfix's hopcount)
    delivered_to: frozenset[str]  # the addresses of its Delivered-To fields, lower-cased


def trace(head: bytes) -> Trace:
    """The trace of the header section `head` (a completed one: nothing is repaired)."""
    try:
        fields, _ = _split(_lines(head))
    except HeaderError:  # over MAX_HEADER_BYTES: a header that long has looped, or lies
        return Trace(MAX_HOPS, frozenset())
    names = [_name(field[0]).lower() for field in fields]
    delivered = frozenset(
        _value(field).strip().lower()
        for name, field in zip(names, fields, strict=True)
        if name == b"delivered-to"
    )
    return Trace(sum(name in (b"received", b"delivered-to") for name in names), delivered)


def body_lines(data: bytes) -> list[bytes]:
    """Split `data` at CRLF, bare CR or bare LF; lines over MAX_LINE octets are broken."""
    return _break_all(_lines(data))


def fold(line: bytes) -> list[bytes]:
    """One header line as lines of at most MAX_LINE octets, folded where possible."""
    pieces: list[bytes] = []
    start = 0
    while len(line) - start > MAX_LINE:
        end = start + MAX_LINE
        # RFC 5322 2.2.3: fold by putting CRLF before whitespace; a piece of whitespace
        # alone would be obsolete syntax, so the cut needs something else before it.
        cut = max(line.rfind(b" ", start + 1, end + 1), line.rfind(b"\t", start + 1, end + 1))
        if cut > start and line[start:cut].strip(_WSP):
            pieces.append(line[start:cut])
            start = cut
        else:
            cut = boundary(line, start)
            pieces.append(line[start:cut])
            # The continuation needs leading whitespace: one space, that much changes.
            line = b" " + line[cut:]
            start = 0
    pieces.append(line[start:])
    return pieces


def _lines(data: bytes) -> list[bytes]:
    # RFC 5322 2.3: CR and LF only ever occur together as CRLF; any lone one ends a line.
    lines = _LINE_END.split(data)
    if lines[-1] == b"":
        # The data ended with a line end (or was empty): no partial last line.
        lines.pop()
    return lines


def _split(lines: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """The header fields (each a list of physical lines) and the body lines."""
    fields: list[list[bytes]] = []
    size = 0
    for index, line in enumerate(lines):
        if line == b"":
            return fields, _break_all(lines[index + 1 :])
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD.match(line):
            fields.append([line])
        else:
            return fields, _break_all(lines[index:])
        size += len(line) + 2
        if size > MAX_HEADER_BYTES:
            raise HeaderError(f"header section over {MAX_HEADER_BYTES} bytes")
    return fields, []


def _break_all(lines: list[bytes]) -> list[bytes]:
    return [piece for line in lines for piece in break_line(line)]


def _name(line: bytes) -> bytes:
    return line.split(b":", 1)[0]


def _value(field: list[bytes]) -> str:
    # RFC 5322 2.2.3: unfolding removes each CRLF that precedes whitespace.
    text = b"".join(field).split(b":", 1)[1]
    return text.decode("utf-8", errors="replace")


def _addresses(field: list[bytes]) -> list[str]:
    """The addresses in an address-list field; HeaderError if it has some we cannot read."""
    value = _value(field)
    found = [address for _, address in getaddresses([value]) if address]
    # Strict getaddresses gives nothing at all for a field it cannot parse; a field with
    # an "@" then surely named somebody, and losing them silently would be worse.
    if (not found and "@" in value) or any(_unusable(address) for address in found):
        name = _name(field[0]).decode("ascii")
        raise HeaderError(f"malformed address in {name}: field")
    return found


def _unusable(address: str) -> bool:
    return "\ufffd" in address or _CONTROL.search(address) is not None


def _recipients(fields: list[list[bytes]], domain: str) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for field in fields:
        if _name(field[0]).lower() in _RECIPIENT_FIELDS:
            for address in _addresses(field):
                found.setdefault(with_domain(address, domain))
    return tuple(found)


def _several_authors(fields: list[list[bytes]]) -> bool:
    """Whether the From fields name more than one mailbox. A mailbox list separates its
    mailboxes with commas (RFC 5322 3.4), so one From field without a comma, as nearly
    every message has, is settled without parsing its addresses."""
    values = [_value(field) for field in fields if _name(field[0]).lower() == b"from"]
    if len(values) == 1 and "," not in values[0]:
        return False
    return sum(1 for value in values for _, address in getaddresses([value]) if address) > 1


def _mailbox(full_name: str | None, address: str) -> str:
    # A name from the command line may hold undecodable bytes as surrogates.
    name = (full_name or "").encode(errors="replace").decode()
    name = " ".join(_CONTROL.sub(" ", name).split())
    if not name:
        return address
    if not name.isascii():
        # RFC 2047 encoded-words, folded into several when long.
        encoded = Header(name, "utf-8", header_name="From").encode(linesep="\r\n")
        return f"{encoded} <{address}>"
    if _SPECIALS.search(name):
        # RFC 5322 3.2.4: quoted-string, with quoted-pairs for backslash and quote.
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


def _added_field(name: str, value: str) -> list[bytes]:
    # Only the encoded-words of a long display name hold CRLF, each followed by a space.
    lines = f"{name}: {value}".encode().split(b"\r\n")
    return [piece for line in lines for piece in fold(line)]


def _check(c: Completion) -> None:
    # These go into header fields verbatim: a line end in one would inject fields.
    for text in (c.domain, c.local_user, c.envelope_sender, c.unique):
        if _CONTROL.search(text) or not text.encode(errors="replace").decode() == text:
            raise HeaderError(f"control character or undecodable byte in {text!r}")
