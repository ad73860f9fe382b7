"""What `nsmail-sendmail` needs to know about its caller, and a cache of it for every uid.

A submission needs little: the caller's domain, queue, sender rule and limits (`Profile`).
Finding them in the configuration means importing the configuration parser and
validating every tenant, on every run: PHP's mail() and cron pay it each time, and it
grows with the number of tenants. So root (the supervisor, at start and at each reload)
writes every uid's profile to a cache beside the configuration, `<file>.submission.cache`
(marshal: read without importing anything; like postmap's tables, not for reading by eye),
stamped with the identity of everything it was made from: the configuration, its
drop-ins, /etc/passwd and /etc/group (inode, size and mtime). `nsmail-sendmail` uses the
cache only while its stamp still matches, and reads the configuration otherwise. Both
give the same answer: the cache is `profile_of` applied to the same files.

Security: the cache is trusted as much as the configuration. It is used only when it is
a regular file owned by the owner of the configuration file and writable by no one else;
that check comes first, as marshal is not meant for data from someone untrusted.
Tenants' users read it (0644), as they read the configuration; it holds nothing more.
"""

from __future__ import annotations

import marshal
import os
import stat

from nsmail.maildrop import write_all
from nsmail.paths import DROPIN_DIR

TYPE_CHECKING = False  # the submission command must not import typing or the parser
if TYPE_CHECKING:
    from nsmail.config import DeliveryConfig, Tenant

    Stamp = list[list[str | int]]

SUFFIX = ".submission.cache"
_FORMAT = 1  # of the cache's contents; a cache of another format is not used
_IDENTITY_FILES = ("/etc/passwd", "/etc/group")  # `user = "name"` depends on them


class Profile:
    """A submitter's tenant, as the submission command sees it.

    A plain class, not a dataclass: dataclasses would cost every submission 14 ms.
    """

    __slots__ = (
        "domain",
        "foreign_senders",
        "gid",
        "is_host",
        "message_size_limit",
        "queue_size_limit",
        "spool",
        "uid",
    )

    def __init__(
        self,
        domain: str,
        spool: str,
        uid: int,
        gid: int,
        is_host: bool,  # the machine's own users' mail (the public maildrop)
        foreign_senders: bool,
        message_size_limit: int,  # 0: none
        queue_size_limit: int,  # 0: none
    ) -> None:
        self.domain = domain
        self.spool = spool
        self.uid = uid
        self.gid = gid
        self.is_host = is_host
        self.foreign_senders = foreign_senders
        self.message_size_limit = message_size_limit
        self.queue_size_limit = queue_size_limit

    def fields(self) -> tuple[str, str, int, int, bool, bool, int, int]:
        return (
            self.domain,
            self.spool,
            self.uid,
            self.gid,
            self.is_host,
            self.foreign_senders,
            self.message_size_limit,
            self.queue_size_limit,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Profile) and self.fields() == other.fields()

    def __repr__(self) -> str:
        return f"Profile{self.fields()!r}"


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


def lookup(config_path: str, uid: int) -> Profile | None:
    """`uid`'s profile from the cache, or None when there is no usable, current cache."""
    try:
        owner = os.stat(config_path).st_uid
        fd = os.open(config_path + SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != owner or info.st_mode & 0o022:
                return None
            cache = marshal.loads(f.read(1 << 24))
        if cache["format"] != _FORMAT or cache["stamp"] != stamp(config_path):
            return None
        return Profile(*cache["uids"].get(uid, cache["host"]))
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None


def refresh(config_path: str) -> bool:
    """Write the cache for the configuration at `config_path` (root); False when the
    files changed while they were read, or do not make a valid configuration."""
    from pathlib import Path

    from nsmail import config as configuration  # root's side only

    before = stamp(config_path)
    try:
        config = configuration.load(Path(config_path))
    except configuration.ConfigError:
        return False
    if stamp(config_path) != before:
        return False
    identities = (configuration.host_identity(config), *config.tenants)
    profiles = {t.uid: profile_of(t, config.delivery).fields() for t in identities}
    cache = {
        "format": _FORMAT,
        "stamp": before,
        "host": profiles[config.host.uid],
        "uids": profiles,
    }
    _write_atomically(config_path + SUFFIX, marshal.dumps(cache))
    return True


def stamp(config_path: str) -> Stamp:
    """What identifies the files a configuration is made from, as they are now."""
    dropins = os.path.join(os.path.dirname(config_path), DROPIN_DIR)
    try:
        names = sorted(n for n in os.listdir(dropins) if n.endswith(".toml"))
    except OSError:
        names = []
    paths = [config_path, dropins, *(os.path.join(dropins, n) for n in names)]
    return [_identity(p) for p in (*paths, *_IDENTITY_FILES)]


def _identity(path: str) -> list[str | int]:
    try:
        info = os.stat(path)
    except OSError:
        return [path]
    return [path, info.st_ino, info.st_size, info.st_mtime_ns]


def _write_atomically(path: str, data: bytes) -> None:
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
