"""A tenant's user's .forward, read by the worker inside its jail, as the tenant.

It is `mail/<user>/.forward` in the tenant's home, beside the user's Maildir: a tenant's
users are its mailboxes, not accounts of the machine, and that directory is their mail
home. Its syntax is nsmail.core.aliases.parse_forward's; an empty one forwards nothing.

Security: runs as the tenant in its jail, on a tenant-written file: opened without
following a symlink and without blocking on a FIFO, used only if it is a regular file, and
read up to MAX_FORWARD bytes; `user` is one of the tenant's configured users.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from nsmail.core.aliases import Forward, Undeliverable, parse_forward
from nsmail.tenant.maildir import MAIL_DIR

FORWARD = ".forward"
MAX_FORWARD = 64 * 1024


def read(home: Path, user: str) -> Forward:
    """The targets of `user`'s .forward; None without one; Undeliverable (temporary: the
    tenant can mend it) for one that cannot be used."""
    where = f"{MAIL_DIR}/{user}/{FORWARD}"
    try:
        fd = os.open(home / where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be read: {e.strerror}"
        return Undeliverable(True, f"4.3.5 {where} {why}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Undeliverable(True, f"4.3.5 {where} is not a regular file")
        data = os.read(fd, MAX_FORWARD + 1)
    except OSError as e:
        return Undeliverable(True, f"4.3.5 {where} cannot be read: {e.strerror}")
    finally:
        os.close(fd)
    if len(data) > MAX_FORWARD:
        return Undeliverable(True, f"4.3.5 {where} is over {MAX_FORWARD} bytes")
    return parse_forward(data.decode("utf-8", "replace")) or None
