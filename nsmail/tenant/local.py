"""The local delivery agent: mail for the tenant's own domain goes to its users' Maildirs.

Security: runs as the tenant in its jail. The local part of a recipient is only used as a
mailbox name after it matched one of the tenant's configured users exactly (case
folded); anything else is an unknown user and bounces.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

from nsmail.core import addresses
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Envelope
from nsmail.tenant import maildir


@dataclass(frozen=True, slots=True)
class LocalAgent:
    """Delivers to the tenant's own users."""

    domain: str
    users: tuple[str, ...]
    home: Path  # "/" inside the jail

    def is_local(self, recipient: str) -> bool:
        return addresses.same_domain(addresses.split(recipient)[1], self.domain)

    def deliver(self, queue_id: str, envelope: Envelope, message: Message) -> list[Outcome]:
        mailboxes = {user.casefold(): user for user in self.users}
        outcomes = []
        for recipient in envelope.recipients:
            user = mailboxes.get(addresses.split(recipient)[0].casefold())
            if user is None:
                outcome = Outcome(recipient, Status.PERMANENT, None, "5.1.1 no such user here", "")
            else:
                outcome = self._store(queue_id, envelope.sender, recipient, user, message)
            outcomes.append(outcome)
        return outcomes

    def _store(
        self, queue_id: str, sender: str, recipient: str, user: str, message: Message
    ) -> Outcome:
        # RFC 5321 4.4: the final delivery adds Return-Path; Delivered-To marks the hop.
        trace = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
        # The same name on every attempt: a retry after a crash replaces, not duplicates.
        tag = hashlib.sha256(recipient.casefold().encode()).hexdigest()[:12]
        try:
            pieces = itertools.chain((trace,), message.wire())
            maildir.deliver(self.home, user, pieces, f"{queue_id}.{tag}.{self.domain}")
        except OSError as e:
            text = f"4.2.0 mailbox write failed: {e.strerror or e}"
            return Outcome(recipient, Status.TEMPORARY, None, text, "")
        return Outcome(recipient, Status.DELIVERED, 250, "2.0.0 delivered to maildir", "local")
