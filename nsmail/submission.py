"""What `nsmail-sendmail` needs to know about its caller, and a cache of it for every uid.

A submission needs little: the caller's domain, queue, sender rule and limits (`Profile`).
Finding them in the configuration means importing the configuration parser and
validating every tenant, on every run: PHP's mail() and cron pay it each time, and it
grows with the number of tenants. So root (the supervisor, at start and at each reload)
writes every uid's profile to a cache beside the configuration, `<file>.submission.json`,
stamped with the identity of everything it was made from: the configuration, its
drop-ins, /etc/passwd and /etc/group (inode, size and mtime). `nsmail-sendmail` uses the
cache only while its stamp still matches, and reads the configuration otherwise. Both
give the same answer: the cache is `profile_of` applied to the same files.

Security: the cache is trusted as much as the configuration. It is used only when it is
a regular file owned by the owner of the configuration file and writable by no one else.
Tenants' users read it (0644), as they read the configuration; it holds nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsmail.paths import DROPIN_DIR
from nsmail.spool import write_all

if TYPE_CHECKING:  # the submission command must not import the configuration parser
    from nsmail.config import DeliveryConfig, Tenant

SUFFIX = ".submission.json"
_IDENTITY_FILES = ("/etc/passwd", "/etc/group")  # `user = "name"` depends on them


@dataclass(frozen=True, slots=True)
class Profile:
    """A submitter's tenant, as the submission command sees it."""

    domain: str
    spool: str
    uid: int
    gid: int
    is_host: bool  # the machine's own users' mail (the public maildrop)
    foreign_senders: bool
    message_size_limit: int  # 0: none
    queue_size_limit: int  # 0: none


def profile_of(tenant: Tenant, delivery: DeliveryConfig) -> Profile:
    limits = tenant.limits(delivery)
    return Profile(
        domain=tenant.domain,
        spool=str(tenant.spool),
        uid=tenant.uid,
        gid=tenant.gid,
        is_host=tenant.is_host,
        foreign_senders=tenant.foreign_senders,
        message_size_limit=limits.message_size,
        # The host's queue is the host worker's, unreadable to the users who submit to it.
        queue_size_limit=0 if tenant.is_host else limits.queue_size,
    )


def lookup(config_path: Path, uid: int) -> Profile | None:
    """`uid`'s profile from the cache, or None when there is no usable, current cache."""
    try:
        owner = os.stat(config_path).st_uid
        fd = os.open(f"{config_path}{SUFFIX}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != owner or info.st_mode & 0o022:
                return None
            cache = json.loads(f.read(1 << 24))
        if cache["stamp"] != stamp(config_path):
            return None
        return Profile(**cache["uids"].get(str(uid), cache["host"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def refresh(config_path: Path) -> bool:
    """Write the cache for the configuration at `config_path` (root); False when the
    files changed while they were read, or do not make a valid configuration."""
    from nsmail import config as configuration  # root's side only

    before = stamp(config_path)
    try:
        config = configuration.load(config_path)
    except configuration.ConfigError:
        return False
    if stamp(config_path) != before:
        return False
    identities = (configuration.host_identity(config), *config.tenants)
    profiles = {t.uid: profile_of(t, config.delivery) for t in identities}
    cache = {
        "stamp": before,
        "host": dataclasses.asdict(profiles[config.host.uid]),
        "uids": {str(uid): dataclasses.asdict(p) for uid, p in profiles.items()},
    }
    _write_atomically(Path(f"{config_path}{SUFFIX}"), json.dumps(cache).encode())
    return True


def stamp(config_path: Path) -> list[list[Any]]:
    """What identifies the files a configuration is made from, as they are now."""
    dropins = config_path.parent / DROPIN_DIR
    try:
        names = sorted(n for n in os.listdir(dropins) if n.endswith(".toml"))
    except OSError:
        names = []
    paths = [str(config_path), str(dropins), *(str(dropins / n) for n in names)]
    return [_identity(p) for p in (*paths, *_IDENTITY_FILES)]


def _identity(path: str) -> list[Any]:
    try:
        info = os.stat(path)
    except OSError:
        return [path]
    return [path, info.st_ino, info.st_size, info.st_mtime_ns]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
