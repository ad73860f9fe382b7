"""Hand-offs as the supervisor carries them out: who may ask for which (nsmail.core.handoff),
and the one-shot child that does it, jailed as the one who may write there.

The host's worker may ask for a mailbox to be written: the child (nsmail.host.mailbox) is
jailed into the mail spool as the mailbox's owner with the spool's group. A tenant's
worker may hand mail to the host's postmaster: the child (nsmail.host.postmaster) is
jailed into the host's queue as `host.user`. Anything else is refused, with an answer.

Security: runs as root in the supervisor and parses no mail. A request is decoded by the
strict, bounded `decode_request`; its two descriptors must be a regular file and a
socket, and are never read here, only passed to the child; the mailbox's owner is looked
up in passwd now. Root's own mailbox is written as uid 0 with no capability at all
(nsmail.root.jail.drop), chrooted into the mail spool: it can write nothing but what root
owns there (as uid 0 it could still signal root's processes; it runs only the writer, on
bytes it copies and does not parse).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from nsmail.core.config import HostConfig, Tenant
from nsmail.core.handoff import MAILBOX, HandoffError, decode_request, encode_answer
from nsmail.host import mailbox, postmaster
from nsmail.root.jail import Identity
from nsmail.root.spawn import Target

MAX_IN_FLIGHT = 4  # hand-offs of one worker at once; its own side keeps to it too


@dataclass(frozen=True, slots=True)
class Job:
    """The child that carries out one hand-off."""

    title: str
    identity: Identity
    target: Target


def plan(data: bytes, fds: list[int], worker: Tenant, host: HostConfig, limit: int) -> Job | str:
    """The child for the request `data` with descriptors `fds` from `worker`'s channel, or
    why it is refused (an answer, its RFC 3463 code first). `limit`: the most bytes the
    host's postmaster takes (0: no limit)."""
    if len(fds) != 2 or not _is(fds[0], stat.S_ISREG) or not _is(fds[1], stat.S_ISSOCK):
        return "4.3.0 a hand-off comes with a message file and an answer socket"
    try:
        request = decode_request(data)
    except HandoffError as e:
        return f"4.3.0 not a hand-off request: {e}"
    if request.kind == MAILBOX:
        if not worker.is_host:
            return "4.3.0 only the host's worker writes mailboxes"
        try:
            owner = pwd.getpwnam(request.user)
            spool = os.stat(host.mail_spool)
        except KeyError:
            return f"5.1.1 no such user here: {request.user}"
        except OSError as e:
            return f"4.3.5 the mail spool {host.mail_spool}: {e.strerror}"
        return Job(
            f"nsmail mailbox {request.user}",
            Identity(uid=owner.pw_uid, gid=spool.st_gid, root=host.mail_spool),
            partial(mailbox.child, request.user, request.sender),
        )
    if worker.is_host:
        return "4.3.0 the host's worker queues its postmaster's mail itself"
    return Job(
        f"nsmail postmaster {worker.domain}",
        Identity(uid=host.uid, gid=host.gid, root=host.spool),
        partial(postmaster.child, host.name, limit),
    )


class InFlight:
    """The hand-off children under way, by domain: asked for, then forked, then reaped."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._pids: dict[int, str] = {}

    def full(self, domain: str) -> bool:
        return self._counts.get(domain, 0) >= MAX_IN_FLIGHT

    def asked(self, domain: str) -> None:
        self._counts[domain] = self._counts.get(domain, 0) + 1

    def forked(self, domain: str, pid: int) -> None:
        self._pids[pid] = domain

    def ended(self, pid: int) -> bool:
        """Whether `pid` was a hand-off child (it is forgotten now)."""
        domain = self._pids.pop(pid, None)
        if domain is not None:
            self.failed(domain)
        return domain is not None

    def failed(self, domain: str) -> None:
        """One of `domain`'s is no longer under way (it ended, or never started)."""
        self._counts[domain] -= 1
        if not self._counts[domain]:
            del self._counts[domain]


def refuse(fds: list[int], why: str) -> None:
    """Answer a refused request on its socket, if it came with one; never blocks."""
    if len(fds) != 2 or not _is(fds[1], stat.S_ISSOCK):
        return
    with socket.socket(fileno=os.dup(fds[1])) as answer, contextlib.suppress(OSError):
        answer.send(encode_answer(why), socket.MSG_DONTWAIT)


def _is(fd: int, kind: Callable[[int], bool]) -> bool:
    try:
        return kind(os.fstat(fd).st_mode)
    except OSError:
        return False
