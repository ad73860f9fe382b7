"""What tests read of delivered mail: the messages in a Maildir, and the per-recipient
fields of an RFC 3464 delivery status notification."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path


def mailbox(home: Path, user: str) -> list[email.message.EmailMessage]:
    new = home / "mail" / user / "new"
    if not new.is_dir():
        return []
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        for p in sorted(new.iterdir())
    ]


def delivery_status(report: email.message.EmailMessage) -> list[dict[str, str]]:
    """The per-recipient fields of an RFC 3464 report."""
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [dict(block.items()) for block in blocks[1:]]
