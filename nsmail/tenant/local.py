"""Local delivery: the mail of the worker's own domain, into mailboxes or forwarded on.

A tenant's own domain is local with `local_delivery = "maildir"` (with "mx" it goes by MX
like any other), the host's name always; for a tenant, so is the host's postmaster,
whose mail is handed to the host's queue (nsmail.host.postmaster). Each local recipient
is checked for a loop first (RFC 5321 6.3: a Delivered-To naming it, or as many hops as
a loop takes; 5.4.6), then resolved through the aliases and .forward files
(nsmail.core.aliases) to mailboxes, written at once, and addresses elsewhere, forwarded as
one new message in the queue: the same sender, a Delivered-To naming the recipient on
top (so that it is caught if it comes round again), and a queue entry of its own, so that
a failure there bounces to the sender as for any message. A tenant's mailboxes are its
users' Maildirs (nsmail.tenant.maildir); the host's are the machine's users' mbox files
in /var/mail, written by a child the supervisor starts for each (nsmail.host.mailbox).

Security: runs as the tenant (or `host.user`) in its jail. A local part is used as a
mailbox name only after it matched one of the configured users (a tenant's, or for the
host one in passwd) exactly, case folded; anything else is an unknown user and bounces.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nsmail.core import addresses, headers
from nsmail.core.aliases import Book, Delivery, Forward, Undeliverable, resolve
from nsmail.core.config import Tenant
from nsmail.core.handoff import MAILBOX, POSTMASTER, Request
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Envelope, frame
from nsmail.tenant import forward, maildir
from nsmail.tenant.handoff import Handoffs
from nsmail.tenant.spool import INCOMING, Spool, new_queue_id


class Mailboxes(Protocol):
    """Where a local user's mail is stored."""

    async def store(
        self, queue_id: str, sender: str, recipient: str, user: str, message: Message
    ) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class Maildirs:
    """A tenant's users' Maildirs, `mail/<user>/` in its home."""

    home: Path  # "/" inside the jail
    domain: str

    async def store(
        self, queue_id: str, sender: str, recipient: str, user: str, message: Message
    ) -> Outcome:
        # The same name on every attempt: a retry after a crash replaces, not duplicates.
        tag = hashlib.sha256(f"{recipient}\0{user}".casefold().encode()).hexdigest()[:12]
        try:
            pieces = itertools.chain((_trace(sender, recipient),), message.wire())
            maildir.deliver(self.home, user, pieces, f"{queue_id}.{tag}.{self.domain}")
        except OSError as e:
            text = f"4.2.0 mailbox write failed: {e.strerror or e}"
            return Outcome(recipient, Status.TEMPORARY, None, text, "")
        return Outcome(recipient, Status.DELIVERED, 250, "2.0.0 delivered to maildir", "local")


@dataclass(frozen=True, slots=True)
class SpoolMailboxes:
    """The machine's users' mailboxes in /var/mail, which the host's worker hands off."""

    handoffs: Handoffs

    async def store(
        self, queue_id: str, sender: str, recipient: str, user: str, message: Message
    ) -> Outcome:
        pieces = itertools.chain((_trace(sender, recipient),), message.wire())
        answer = await self.handoffs.hand_off(Request(MAILBOX, user, sender), pieces)
        return _outcome(recipient, answer.status, answer.text)


@dataclass(frozen=True, slots=True)
class LocalAgent:
    """Delivers the mail of the worker's own domain (and a tenant's to the host's postmaster)."""

    book: Book  # the domain's names: aliases, users' mailboxes, .forward files
    mailboxes: Mailboxes
    spool: Spool  # where forwarded copies are queued
    clock: Callable[[], float]
    by_mx: bool = False  # local_delivery = "mx": the domain's mail is not local
    host_postmaster: str | None = None  # a tenant's: the host's postmaster, handed off
    handoffs: Handoffs | None = None

    @property
    def domain(self) -> str:
        return self.book.domain

    def is_local(self, recipient: str) -> bool:
        if self._to_host_postmaster(recipient):
            return True
        return not self.by_mx and addresses.same_domain(addresses.split(recipient)[1], self.domain)

    async def deliver(self, queue_id: str, envelope: Envelope, message: Message) -> list[Outcome]:
        seen = headers.trace(message.prefix(headers.MAX_HEADER_BYTES))
        return [
            await self._deliver(queue_id, envelope.sender, recipient, message, seen)
            for recipient in envelope.recipients
        ]

    async def _deliver(
        self, queue_id: str, sender: str, recipient: str, message: Message, seen: headers.Trace
    ) -> Outcome:
        if self._to_host_postmaster(recipient):
            if self.handoffs is None:
                return _outcome(recipient, Status.TEMPORARY, "4.3.0 no hand-off channel here")
            answer = await self.handoffs.hand_off(Request(POSTMASTER, "", ""), message.raw())
            return _outcome(recipient, answer.status, answer.text)
        if recipient.lower() in seen.delivered_to:
            return _outcome(
                recipient, Status.PERMANENT, f"5.4.6 mail forwarding loop for {recipient}"
            )
        if seen.hops >= headers.MAX_HOPS:
            return _outcome(
                recipient, Status.PERMANENT, f"5.4.6 too many hops ({seen.hops}): a loop"
            )
        found = resolve(addresses.split(recipient)[0], self.book)
        if isinstance(found, Undeliverable):
            status = Status.TEMPORARY if found.temporary else Status.PERMANENT
            return _outcome(recipient, status, found.text)
        done = []
        for user in found.mailboxes:
            stored = await self.mailboxes.store(queue_id, sender, recipient, user, message)
            if stored.status != Status.DELIVERED:
                return stored  # a retry writes each again, under the same name (Maildir)
            done.append(stored.text.removeprefix("2.0.0 "))
        if found.forward:
            try:
                done.append(f"forwarded as {self._forward(sender, recipient, found, message)}")
            except OSError as e:
                text = f"4.3.0 the forwarded copy cannot be queued: {e.strerror or e}"
                return _outcome(recipient, Status.TEMPORARY, text)
        return _outcome(recipient, Status.DELIVERED, "2.0.0 " + "; ".join(done))

    def _forward(self, sender: str, recipient: str, found: Delivery, message: Message) -> str:
        """Queue the copy for the addresses elsewhere; its queue id."""
        now = self.clock()
        queue_id = new_queue_id(now)
        envelope = Envelope(sender, found.forward, arrival=now, cleaned=True)
        pieces = itertools.chain((f"Delivered-To: {recipient}\r\n".encode(),), message.raw())
        self.spool.put(INCOMING, queue_id, frame(envelope, pieces))
        return queue_id

    def _to_host_postmaster(self, recipient: str) -> bool:
        return self.host_postmaster is not None and recipient.lower() == self.host_postmaster


def _trace(sender: str, recipient: str) -> bytes:
    # RFC 5321 4.4: the final delivery adds Return-Path; Delivered-To marks the hop.
    return f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()


def _outcome(recipient: str, status: Status, text: str) -> Outcome:
    if status == Status.DELIVERED:
        return Outcome(recipient, status, 250, text, "local")
    return Outcome(recipient, status, None, text, "")


def for_tenant(
    tenant: Tenant, home: Path, spool: Spool, host_postmaster: str, handoffs: Handoffs | None
) -> LocalAgent:
    """A tenant's: its users' Maildirs in `home` (as the worker sees it), their .forward."""
    forwards = functools.partial(forward.read, home)
    return LocalAgent(
        book_of(tenant.domain, tenant.aliases, tenant.users, forwards),
        Maildirs(home, tenant.domain),
        spool,
        time.time,
        by_mx=tenant.local_delivery == "mx",
        host_postmaster=host_postmaster,
        handoffs=handoffs,
    )


def for_host(host: Tenant, logins: Iterable[str], spool: Spool, handoffs: Handoffs) -> LocalAgent:
    """The host's: the mailboxes of the machine's `logins` in /var/mail, after its aliases."""
    book = book_of(host.domain, host.aliases, logins)
    return LocalAgent(book, SpoolMailboxes(handoffs), spool, time.time)


def book_of(
    domain: str,
    aliases: Iterable[tuple[str, tuple[str, ...]]],
    users: Iterable[str],
    forward: Callable[[str], Forward] = lambda user: None,
) -> Book:
    """A domain's names: its aliases, and mailboxes for `users` (matched case folded)."""
    mailboxes = {user.casefold(): user for user in users}
    return Book(domain, dict(aliases), lambda name: mailboxes.get(name.casefold()), forward)
