"""Delivery status notifications (RFC 3464), composed as bytes ready for SMTP DATA.

A notification is a multipart/report (RFC 6522) of three parts: a note for people, the
machine-readable message/delivery-status, and the original message (message/rfc822) or
only its header (text/rfc822-headers, what RFC 3461 4.3 calls RET=HDRS) when the original
is too large or the body is not wanted. The caller sends it with the null reverse-path
(RFC 5321 4.5.5) so it can never cause another notification.

The original is copied as it is, line ends repaired, never re-encoded; if it holds 8-bit
bytes the notification says Content-Transfer-Encoding: 8bit. The delivery-status fields
stay 7-bit: a non-ASCII character there is written as RFC 6533 3 \\x{HEX}, and an address
holding one gets the "utf-8" address type.

Security: runs as the tenant. `failures` hold text from remote servers (diagnostics) and
from the tenant (addresses), `original` is tenant-written: control characters are turned
into spaces before any of them reaches a header or status field, and the MIME boundary
is chosen so it occurs in no part.
"""

from __future__ import annotations

import binascii
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Literal

from nsmail.core.headers import body_lines, fold

# RFC 3463 2: class.subject.detail.
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# RFC 3464 2.3.6: diagnostic-type ";" text; without a type we name ourselves.
_TYPED = re.compile(r"[A-Za-z][A-Za-z0-9-]*;")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BOUNDARY_UNSAFE = re.compile(r"[^A-Za-z0-9'()+_,./:=?-]")

# Larger originals are returned as their header section only (RET=HDRS).
MAX_ORIGINAL = 64 * 1024


@dataclass(frozen=True, slots=True)
class Failure:
    """What happened to one recipient."""

    recipient: str
    status: str  # RFC 3463 enhanced code, e.g. "5.1.1"
    action: Literal["failed", "delayed"]
    # RFC 3464 2.3.6: a remote server's reply, e.g. "smtp; 550 5.1.1 no such user"; only
    # for a real reply, never for a failure nsmail decided itself (see `detail`).
    diagnostic: str | None = None
    remote_mta: str | None = None  # host name of the server that gave that reply
    detail: str | None = None  # nsmail's own words when no server replied, for people only

    def __post_init__(self) -> None:
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"not an enhanced status code: {self.status!r}")
        if self.action not in ("failed", "delayed"):
            raise ValueError(f"not a DSN action we send: {self.action!r}")
        if self.remote_mta and not self.diagnostic:
            raise ValueError("a Remote-MTA without its reply")


def bounce(
    *,
    reporting_mta: str,
    original_sender: str,
    failures: Sequence[Failure],
    original: bytes,
    arrival: datetime,
    now: datetime,
    unique: str,
    delayed: bool = False,
    double: bool = False,
    include_body: bool = True,
    max_original: int = MAX_ORIGINAL,
) -> bytes:
    """The notification to `original_sender` about `failures` of the message `original`.

    `delayed` makes it a warning (the message is still queued) rather than a bounce;
    `double` a notice to the postmaster (`original_sender` then) that `original`, itself
    a bounce, could not be delivered, with `original`'s header only (a double bounce);
    `unique` is the left-hand side of its Message-ID and part of its MIME boundary.
    """
    if not original_sender:
        # RFC 5321 6.1: never notify the null reverse-path.
        raise ValueError("no notification for the null sender")
    if not failures:
        raise ValueError("a notification needs at least one recipient")
    subject = "Undelivered Mail Returned to Sender"
    if delayed:
        subject = "Delayed Mail (still being retried)"
    elif double:
        subject = "Postmaster Warning: Undelivered Bounce"  # Postfix's 2bounce words
    text = _text_part(reporting_mta, failures, delayed, double)
    status = _status_part(reporting_mta, failures, arrival, now)
    returned = _returned_part(original, include_body and not double, max_original)
    boundary = _boundary(unique, reporting_mta, [text, status, returned])
    eight_bit = any(byte > 0x7F for byte in returned)
    header = [
        f"From: Mail Delivery System <MAILER-DAEMON@{_clean(reporting_mta)}>",
        f"To: {_clean(original_sender)}",
        f"Subject: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{_clean(unique)}@{_clean(reporting_mta)}>",
        # RFC 3834 5: an automatic reply, not to be answered automatically.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
    ]
    if eight_bit:
        # RFC 2046 5.1: a multipart holding 8-bit data must itself be labelled so.
        header.append("Content-Transfer-Encoding: 8bit")
    lines = [piece for field in header for piece in _field_lines(field)]
    lines += [b"", b"This is a MIME-encapsulated message.", b""]
    out = b"".join(line + b"\r\n" for line in lines)
    for part in (text, status, returned):
        out += b"--" + boundary.encode() + b"\r\n" + part
    return out + b"--" + boundary.encode() + b"--\r\n"


def _text_part(
    reporting_mta: str, failures: Sequence[Failure], delayed: bool, double: bool
) -> bytes:
    if double:
        opening = [
            "A notice of non-delivery could not be delivered to the sender of the",
            "undelivered message, below. Nobody else was told; its header is attached.",
        ]
    elif delayed:
        opening = [
            "Your message has not been delivered yet to the recipients below.",
            "This is only a warning: the mail system keeps trying, and will tell you",
            "again if it has to give up. You do not need to send the message again.",
        ]
    else:
        opening = [
            "Your message could not be delivered to the recipients below.",
            "The mail system has given up; the message is attached.",
        ]
    lines = [f"This is the mail system at {_clean(reporting_mta)}.", "", *opening, ""]
    for failure in failures:
        lines.append(f"<{_clean(failure.recipient)}>:")
        if failure.remote_mta:
            lines.append(f"    host {_clean(failure.remote_mta)} said:")
        lines.append(f"    {_clean(failure.diagnostic or failure.detail or 'no further detail')}")
        lines.append("")
    # Diagnostics and addresses can be long: wrapped, with the indent marking continuations.
    wrapped = [
        piece
        for line in lines
        for piece in textwrap.wrap(line, 76, subsequent_indent="      ", break_on_hyphens=False)
        or [""]
    ]
    body = "\r\n".join(wrapped).encode()
    if body.isascii():
        head = b"Content-Type: text/plain; charset=us-ascii\r\n"
        encoded = body + b"\r\n"
    else:
        head = (
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n"
        )
        # RFC 2045 6.7: quoted-printable keeps the part 7-bit with lines under 77.
        encoded = b"".join(
            binascii.b2a_qp(line).replace(b"=\n", b"=\r\n") + b"\r\n"
            for line in body.split(b"\r\n")
        )
    return b"Content-Description: Notification\r\n" + head + b"\r\n" + encoded


def _status_part(
    reporting_mta: str, failures: Sequence[Failure], arrival: datetime, now: datetime
) -> bytes:
    # RFC 3464 2.2: the per-message fields, then one block per recipient, blank-separated.
    blocks = [
        [
            f"Reporting-MTA: dns; {_ascii(reporting_mta)}",
            f"Arrival-Date: {format_datetime(arrival)}",
        ]
    ]
    for failure in failures:
        block = [f"Final-Recipient: {_address(failure.recipient)}"]
        block.append(f"Action: {failure.action}")
        block.append(f"Status: {failure.status}")
        if failure.remote_mta:
            block.append(f"Remote-MTA: dns; {_ascii(failure.remote_mta)}")
        if failure.diagnostic:
            block.append(f"Diagnostic-Code: {_diagnostic(failure.diagnostic)}")
        block.append(f"Last-Attempt-Date: {format_datetime(now)}")
        blocks.append(block)
    body = b"".join(
        b"".join(line + b"\r\n" for field in block for line in _field_lines(field)) + b"\r\n"
        for block in blocks
    )
    return (
        b"Content-Description: Delivery report\r\n"
        b"Content-Type: message/delivery-status\r\n\r\n" + body
    )


def _returned_part(original: bytes, include_body: bool, max_original: int) -> bytes:
    lines = body_lines(original.replace(b"\0", b""))
    if include_body and len(original) <= max_original:
        head = b"Content-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n"
    else:
        head = (
            b"Content-Description: Undelivered Message Headers\r\n"
            b"Content-Type: text/rfc822-headers\r\n"
        )
        lines = _header_lines(lines, max_original)
    content = b"".join(line + b"\r\n" for line in lines)
    if any(byte > 0x7F for byte in content):
        # RFC 2046 5.2.1: message/rfc822 may only be 7bit, 8bit or binary, never encoded.
        head += b"Content-Transfer-Encoding: 8bit\r\n"
    return head + b"\r\n" + content + b"\r\n"


def _header_lines(lines: list[bytes], limit: int) -> list[bytes]:
    """The header section of the message in `lines`, whole lines up to `limit` bytes."""
    kept: list[bytes] = []
    size = 0
    for line in lines:
        size += len(line) + 2
        if line == b"" or size > limit:
            break
        kept.append(line)
    return kept


def _boundary(unique: str, reporting_mta: str, parts: Sequence[bytes]) -> str:
    # RFC 2046 5.1.1: at most 70 characters, and occurring in none of the parts. "=_" can
    # start no base64 or quoted-printable line, so a collision needs a deliberate one.
    stem = _BOUNDARY_UNSAFE.sub("_", f"=_{unique}/{reporting_mta}")[:60]
    counter = 0
    while True:
        boundary = f"{stem}/{counter}"
        marker = b"--" + boundary.encode()
        if not any(marker in part for part in parts):
            return boundary
        counter += 1


def _clean(text: str) -> str:
    """`text` on one line: control characters become spaces, undecodable bytes '?'."""
    return _CONTROL.sub(" ", text.encode(errors="replace").decode())


def _ascii(text: str) -> str:
    # RFC 6533 3: EmbeddedUnicodeChar keeps delivery-status fields 7-bit.
    return "".join(char if char.isascii() else f"\\x{{{ord(char):X}}}" for char in _clean(text))


def _address(address: str) -> str:
    # RFC 3464 2.3.2 address-type; RFC 6533 3 "utf-8" for an internationalized one.
    kind = "rfc822" if address.isascii() else "utf-8"
    return f"{kind}; {_ascii(address)}"


def _diagnostic(diagnostic: str) -> str:
    text = _ascii(diagnostic)
    return text if _TYPED.match(text) else f"X-nsmail; {text}"


def _field_lines(field: str) -> list[bytes]:
    lines = field.encode(errors="replace").split(b"\r\n")
    return [piece for line in lines for piece in fold(line)]
