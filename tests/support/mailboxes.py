"""What tests read of delivered mail: the messages in a Maildir or an mbox (as mail(1)
reads /var/mail), and the per-recipient fields of an RFC 3464 delivery status notification."""

from __future__ import annotations

import email
import email.policy
import mailbox as mailboxes
from pathlib import Path


def mailbox(home: Path, user: str) -> list[email.message.EmailMessage]:
    new = home / "mail" / user / "new"
    if not new.is_dir():
        return []
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        for p in sorted(new.iterdir())
    ]


def mbox(path: Path) -> list[email.message.EmailMessage]:
    """The messages of the mbox file `path` (none if there is no such file)."""
    if not path.exists():
        return []
    box = mailboxes.mbox(path, create=False)
    try:
        return [
            email.message_from_bytes(entry.as_bytes(), policy=email.policy.default) for entry in box
        ]
    finally:
        box.close()


def delivery_status(report: email.message.EmailMessage) -> list[dict[str, str]]:
    """The per-recipient fields of an RFC 3464 report."""
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [dict(block.items()) for block in blocks[1:]]
