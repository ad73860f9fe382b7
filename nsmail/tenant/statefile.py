"""Small files a worker keeps in its spool between runs (MTA-STS policies, the day's TLS
tally): read without following symlinks, replaced whole with an atomic rename.

Security: runs as the tenant inside its jail; the files are the tenant's own (it can write
its spool), so what they hold is the caller's to distrust, and a planted symlink is never
followed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from nsmail.submit.maildrop import unlink_quietly, write_all


def read(path: Path, limit: int) -> bytes | None:
    """At most `limit` bytes of the file at `path`; None if there is none to read."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            return f.read(limit)
    return None


def replace(path: Path, data: bytes) -> None:
    """`data` as the file at `path` (its directory made if need be), written and synced
    under a temporary name first, so that a crash leaves the old file or the new one."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)
