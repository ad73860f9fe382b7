"""An SMTP session on its way to the tenant's worker: who the client is, in one datagram.

Pure. The connection itself travels beside it (SCM_RIGHTS); this says whose it is. Two
senders make one: the supervisor for a connection to a local listener, naming the uid
the kernel gave for the peer (SO_PEERCRED, sock_diag), and the submission front for a
client that authenticated on 587 or 465, naming the address it authenticated as (the
supervisor passes that on to the tenant of its domain). `encode` and `decode` are the
one format; `decode` refuses anything but exactly these fields.

Security: the supervisor decodes what the front sends (an unprivileged process that
talks to remote clients): bounded, strict, and only ValueError. The worker decodes
what the supervisor sends.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from nsmail.core.smtp.auth import MAX_NAME

MAX_HANDOFF = 1024
MAX_CLIENT = 200  # characters of the client's description


class HandoffError(ValueError):
    """The datagram is not a session handoff."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """One session: exactly one of `uid` (local, the kernel's word) and `user` (remote,
    authenticated as user@domain). `client` names the client for the log."""

    client: str
    uid: int | None = None
    user: str | None = None

    @property
    def domain(self) -> str | None:
        """The domain of the authenticated user (None for a local session)."""
        return None if self.user is None else self.user.rpartition("@")[2].lower()


def encode(handoff: Handoff) -> bytes:
    return json.dumps(asdict(handoff), separators=(",", ":"), ensure_ascii=True).encode()


def decode(data: bytes) -> Handoff:
    if len(data) > MAX_HANDOFF:
        raise HandoffError(f"{len(data)} bytes, more than {MAX_HANDOFF}")
    try:
        fields = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HandoffError("not JSON") from None
    if not isinstance(fields, dict) or set(fields) != set(Handoff.__dataclass_fields__):
        raise HandoffError("fields missing or unknown")
    client, uid, user = fields["client"], fields["uid"], fields["user"]
    if not isinstance(client, str) or len(client) > MAX_CLIENT or not client.isprintable():
        raise HandoffError("bad client")
    if (uid is None) == (user is None):
        raise HandoffError("neither or both of uid and user")
    if uid is not None and (type(uid) is not int or not 0 <= uid < 2**32):
        raise HandoffError("bad uid")
    if user is not None and not _is_user(user):
        raise HandoffError("bad user")
    return Handoff(client, uid, user)


def _is_user(user: object) -> bool:
    if not isinstance(user, str) or len(user) > MAX_NAME or not user.isprintable():
        return False
    local, at, domain = user.rpartition("@")
    return bool(at and local and domain) and " " not in user
