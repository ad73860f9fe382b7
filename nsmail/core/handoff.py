"""Hand-offs: mail a worker may not write itself, asked of the supervisor in a small format.

Two kinds cross a jail. The host's worker, which runs as `host.user`, hands root's and
the machine's users' mail to their mailboxes in /var/mail (`mailbox`); a tenant's worker
hands mail for the host's postmaster, double bounces above all, to the host's queue
(`postmaster`). A request is one JSON object in one datagram with exactly the fields of
`Request`, and carries two descriptors: the message (a regular file) and the socket the
one-shot child that writes it answers on. The answer is one line, `Answer`: an RFC 3463
status and words, e.g. "2.0.0 delivered to the mailbox of root". Pure.

Security: requests come from workers, which a tenant may control, and are decoded by root
(`decode_request` raises only HandoffError); answers come from a child jailed as the
mailbox's owner or the host's user, and are decoded by the worker.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from nsmail.core.outcome import Status
from nsmail.core.records import fields_of

MAILBOX = "mailbox"
POSTMASTER = "postmaster"
KINDS = (MAILBOX, POSTMASTER)
MAX_REQUEST = 1024
MAX_ANSWER = 512
# A login name as useradd(8) takes one, so also a file name in /var/mail.
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")
_ADDRESS_MAX = 320  # RFC 5321 4.5.3.1.3: a path of at most 256 octets, with room to spare
_STATUS = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3} ")


class HandoffError(ValueError):
    """The datagram is not a valid hand-off request."""


@dataclass(frozen=True, slots=True)
class Request:
    kind: str  # one of KINDS
    user: str  # mailbox: whose mailbox; postmaster: ""
    sender: str  # the envelope sender, for the mailbox's "From " line ("" for the null one)


@dataclass(frozen=True, slots=True)
class Answer:
    status: Status
    text: str  # starting with its RFC 3463 code


def encode_request(request: Request) -> bytes:
    return json.dumps(asdict(request), separators=(",", ":"), ensure_ascii=True).encode()


def decode_request(data: bytes) -> Request:
    fields = fields_of(data, MAX_REQUEST, Request, HandoffError)
    kind, user, sender = fields["kind"], fields["user"], fields["sender"]
    if kind not in KINDS:
        raise HandoffError("unknown kind")
    if not isinstance(user, str) or (kind == MAILBOX) != bool(_USER.fullmatch(user)):
        raise HandoffError("a mailbox names a login name, and only a mailbox does")
    if not isinstance(sender, str) or len(sender) > _ADDRESS_MAX or not sender.isprintable():
        raise HandoffError("bad sender")
    return Request(kind, user, sender)


def encode_answer(text: str) -> bytes:
    """An answer: `text` starts with its RFC 3463 status."""
    return text.encode("utf-8", "replace")[:MAX_ANSWER]


def decode_answer(data: bytes) -> Answer:
    """The child's answer; anything but one (nothing, garbage) is a temporary failure."""
    text = data[:MAX_ANSWER].decode("utf-8", "replace")
    found = _STATUS.match(text)
    if found is None or not text.isprintable():
        return Answer(Status.TEMPORARY, "4.3.0 the hand-off ended without an answer")
    status = {"2": Status.DELIVERED, "4": Status.TEMPORARY, "5": Status.PERMANENT}
    return Answer(status[found.group(1)], text)
