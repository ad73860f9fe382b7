"""`nsmail-sendmail -bs`: SMTP on standard input and output, a thin shell over
`nsmail.core.smtp.server`; the same shell serves the sessions of nsmail's SMTP listeners.

Symfony Mailer (so Laravel) runs `sendmail -bs` by default. Each message is checked and
stored as a submission from the command line is (`nsmail.submit.sendmail`): the same sender
rule, queue limit and size limit, the same maildrop file with headers completed by the
worker. Every refusal is a reply: 553 5.7.1 for a sender outside the tenant's domain,
501 for an address that cannot be one, 552 5.3.4 for a message over the size limit, 452
4.3.1 for a full queue or disk (451 4.3.0 for another storage error); 250 only once the
message is durably on disk. Replies are written when the server would wait for input,
so a pipelining client gets them in one write. The session ends with QUIT or at the end
of input; a message not complete by then is not queued. The exit status is 0 either
way: what happened to each message is in its reply.

`serve` takes the server and a `Connection` (read, write): -bs gives it stdin and
stdout, the tenant's worker a socket with deadlines (`nsmail.tenant.smtpd`), so a
message submitted over SMTP to a listener meets exactly these checks and this store.

Security: runs as the submitting user, like the rest of `nsmail-sendmail` (root has
become the tenant before), or in the tenant's worker as the tenant. What the client
sends reaches only the protocol core and, as message content, the tenant's own maildrop.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from nsmail.core.exitcodes import EX_NOPERM, EX_TEMPFAIL, EX_USAGE
from nsmail.core.smtp import server as smtp
from nsmail.submit.maildrop import write_all
from nsmail.submit.sendmail import SendmailError, envelope_sender, make_room, qualify, store

if TYPE_CHECKING:
    from nsmail.core.queueframe import Field
    from nsmail.submit.submission import Profile

_CHUNK = 1 << 16
_STDIN, _STDOUT = 0, 1
# A session measures its queue (all its files: `make_room`) at its first MAIL and then
# at most this often: a session of thousands of messages would otherwise spend most of
# its time on stat(2), and the limit is a brake on a runaway script, not a quota.
_MEASURE_EVERY = 1.0
# Storage errors that a full disk or quota causes (RFC 3463 4.3.1: mail system full).
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class _Dropped(Exception):
    """The message in progress will not be queued (smtpserver.Aborted)."""


class Gone(Exception):
    """The client closed its end, or took too long: nothing more can be said."""


class Connection(Protocol):
    """Where the session's bytes come from and go; either may raise Gone."""

    def read(self) -> bytes: ...  # b"" at the end of input

    def write(self, data: bytes) -> None: ...


class _Stdio:
    """-bs: the client is on stdin and stdout."""

    def read(self) -> bytes:
        return os.read(_STDIN, _CHUNK)

    def write(self, data: bytes) -> None:
        try:
            write_all(_STDOUT, data)
        except BrokenPipeError as e:
            raise Gone from e


class _Session:
    """The server and the bytes it has for the client, not yet written."""

    def __init__(self, server: smtp.Server, connection: Connection) -> None:
        self.server = server
        self.connection = connection
        self._unsent: list[bytes] = []

    def next_event(self) -> smtp.Event:
        """The next event that needs more than IO: replies buffered, input read."""
        while True:
            event = self.server.next_event()
            if isinstance(event, smtp.Output):
                self._unsent.append(event.data)
            elif event is smtp.NEED_DATA:
                self.flush()
                self.server.receive(self.connection.read())
            else:
                return event

    def flush(self) -> None:
        data, self._unsent = b"".join(self._unsent), []
        if data:
            self.connection.write(data)


class _Incoming:
    """The message's content as the server passes it on, for `store` to consume."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self.ended = False  # EndOfMessage was seen: the server waits for its answer
        self.dropped = False
        self.size = 0  # bytes of the message so far

    def __iter__(self) -> Iterator[bytes]:
        while not (self.ended or self.dropped):
            event = self._session.next_event()
            if isinstance(event, smtp.Content):
                self.size += len(event.data)
                yield event.data
            elif isinstance(event, smtp.EndOfMessage):
                self.ended = True
            else:  # Aborted: over the size limit, or the input ended
                self.dropped = True
                raise _Dropped

    def drain(self) -> None:
        """Read to the end of the message (storing it failed part way)."""
        for _ in self:
            pass


def serve_stdio(tenant: Profile, login: str, full_name: str) -> None:
    """-bs: one SMTP session on stdin and stdout for `tenant`'s user `login`."""
    server = smtp.Server(tenant.domain, size_limit=tenant.message_size_limit)
    serve(server, _Stdio(), tenant, login, full_name)


def serve(
    server: smtp.Server, connection: Connection, tenant: Profile, login: str, full_name: str
) -> None:
    """Serve one SMTP session over `connection` for `tenant`'s user `login`: every
    message checked and stored as nsmail-sendmail stores one; returns when it is over."""
    session = _Session(server, connection)
    room = _Room(tenant)
    try:
        while not isinstance(event := session.next_event(), smtp.Closed):
            if isinstance(event, smtp.Mail):
                session.server.answer(_mail(event, login, tenant, room))
            elif isinstance(event, smtp.Recipient):
                session.server.answer(_recipient(event, tenant))
            elif isinstance(event, smtp.Data):
                session.server.answer()
                room.stored(_message(session, event, login, full_name, tenant))
        session.flush()
    except Gone:
        return


class _Room:
    """`make_room` for a session: the queue measured at most every _MEASURE_EVERY
    seconds, the session's own messages added in between."""

    def __init__(self, tenant: Profile) -> None:
        self.tenant = tenant
        self._measured_at = float("-inf")  # monotonic
        self._queued = 0  # bytes, as measured then, and stored by this session since

    def make(self) -> None:
        now = time.monotonic()
        if now - self._measured_at >= _MEASURE_EVERY:
            self._queued = make_room(self.tenant)
            self._measured_at = now
        else:
            make_room(self.tenant, self._queued)

    def stored(self, size: int) -> None:
        self._queued += size


def _mail(event: smtp.Mail, login: str, tenant: Profile, room: _Room) -> smtp.Reply | None:
    try:
        envelope_sender(event.sender, login, tenant)
        room.make()
    except SendmailError as e:
        return _refusal(e, {EX_USAGE: "501 5.1.7", EX_NOPERM: "553 5.7.1"})
    return None


def _recipient(event: smtp.Recipient, tenant: Profile) -> smtp.Reply | None:
    try:
        qualify(event.address, tenant.domain)
    except SendmailError as e:
        return _refusal(e, {EX_USAGE: "501 5.1.3"})
    return None


def _message(
    session: _Session, event: smtp.Data, login: str, full_name: str, tenant: Profile
) -> int:
    """Store the message the client sends now, and answer its end; the bytes stored."""
    # The fields of queuefile.Envelope a submission sets (as nsmail.submit.sendmail's). Checked
    # when MAIL and RCPT were answered: the same functions give the same addresses.
    envelope: dict[str, Field] = {
        "sender": envelope_sender(event.sender, login, tenant),
        "recipients": [qualify(r, tenant.domain) for r in event.recipients],
        "submitter": login,
        "full_name": full_name,
        "extract": False,
    }
    incoming = _Incoming(session)
    try:
        queue_id = store(tenant, envelope, incoming)
    except _Dropped:
        return 0  # the server has the reply, if the session goes on
    except SendmailError as e:
        try:
            incoming.drain()
        except _Dropped:
            return 0
        session.server.answer(_refusal(e, {}))
        return 0
    session.server.answer(smtp.Reply(250, f"2.0.0 Ok: queued as {queue_id}"))
    return incoming.size


def _refusal(error: SendmailError, replies: dict[int, str]) -> smtp.Reply:
    """The reply for a refusal of nsmail.submit.sendmail's, by its exit status."""
    if error.code == EX_TEMPFAIL:
        cause = error.__cause__
        full = not isinstance(cause, OSError) or cause.errno in _FULL  # a full queue, or disk
        code, status = ("452", "4.3.1") if full else ("451", "4.3.0")
    else:
        code, status = replies[error.code].split()
    return smtp.Reply(int(code), f"{status} {error.message}")
