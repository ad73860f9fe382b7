"""The worker's DKIM signer: its tenant's key, read from root's file before the jail.

Security: `load_signer` runs as root in the worker's `prepare`, before the jail, and
opens only a root-owned file that no one else may read (0600), without following
symlinks. `nsmail dkim keygen` writes keys that way, outside every tenant home, so after
the chroot the file is out of reach, and no tenant's uid can ever open it. The key then
lives only in that worker's memory, which the uid change left non-dumpable (with the
default fs.suid_dumpable = 0), so not even the tenant's own processes can read it out.
`nsmail check` reads the keys the same way, to find a broken one before a worker does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nsmail.core.dkim import DkimError, Signer, signer_from_pem
from nsmail.core.message import Message

MAX_KEY_FILE = 65536


def load_signer(domain: str, selector: str, path: Path) -> Signer:
    """Read the key at `path`, which must be a regular file that only root can read.

    Called as root before the jail. Signs once, so that everything OpenSSL loads on
    first use is loaded while the host's files are still there.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise DkimError(f"{path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DkimError(f"{path}: not a regular file")
        if info.st_uid != 0 or info.st_mode & 0o077:
            # Like OpenDKIM: a key others could read is refused, not used.
            raise DkimError(
                f"{path}: must be owned by root and readable by root only (0600), "
                f"is uid {info.st_uid} mode {stat.S_IMODE(info.st_mode):04o}"
            )
        pem = os.read(fd, MAX_KEY_FILE)
    finally:
        os.close(fd)
    signer = signer_from_pem(domain, selector, pem)
    signer.sign(Message.of(b"From: <warm-up@" + domain.encode() + b">\r\n\r\n"), 0.0)
    return signer
