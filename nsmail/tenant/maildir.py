"""Local delivery into Maildir (one file per message, tmp/ then new/), as the tenant.

A tenant's local mailboxes are `mail/<user>/` in its home (inside the jail: `/mail/<user>`),
each a Maildir with tmp/, new/ and cur/. A message is written to tmp/ under a unique name,
fsynced, then linked into new/ and the directory fsynced: a reader never sees a partial
message, and a crash leaves at most a stray file in tmp/.

Security: runs as the tenant in its jail; `user` must be one of the tenant's configured
users (the caller checks), and is never used as a path without that check.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from nsmail.submit.maildrop import write_pieces

MAIL_DIR = "mail"


def deliver(home: Path, user: str, message: Iterable[bytes], unique: str) -> Path:
    """Store `message`, in pieces (already carrying Return-Path and Delivered-To), for `user`.

    Storing under a name already in new/ replaces that file, so a retried delivery
    does not duplicate.
    """
    box = home / MAIL_DIR / user
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = box / "tmp" / unique
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_pieces(fd, message)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    final = box / "new" / unique
    os.rename(tmp, final)
    fd = os.open(box / "new", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final
