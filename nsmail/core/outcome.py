"""What happened to one recipient in one delivery attempt: the agents' one result type."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    DELIVERED = "sent"
    TEMPORARY = "deferred"
    PERMANENT = "bounced"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One recipient's result. `code` is the server's reply code, None when no server
    answered for it (nsmail decided, or there was no connection); `text` starts with the
    RFC 3463 status code when one is known."""

    recipient: str
    status: Status
    code: int | None
    text: str
    relay: str  # host[address]:port, "local", or "" when no connection was made
    # The TLS policy that applied to the attempt and what came of it: none, may, verified,
    # dane, mta-sts (nsmail.tenant.remote's Opened.tls); "" when no session was tried.
    tls: str = ""
