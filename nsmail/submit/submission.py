"""What `nsmail-sendmail` needs to know about its caller, and a cache of it for every uid.

A submission needs little: the caller's domain, queue, sender rule, limits and local
users (`Profile`). Finding them in the configuration means importing the configuration
parser and validating every tenant, on every run: PHP's mail() and cron pay it each
time, and it grows with the number of tenants. So root (the supervisor, at start and at
each reload) writes every uid's profile to a cache beside the configuration,
`<file>.submission.cache` (marshal: read without importing anything; like postmap's
tables, not for reading by eye), stamped with the identity of everything it was made
from: the configuration, its drop-ins, /etc/passwd and /etc/group (inode, size and
mtime). Root writes it only from a valid configuration, so it is always the last good one.

`nsmail-sendmail` uses the cache while its stamp still matches (`Profiles.current`).
When the files changed it reads the configuration: a valid one wins (both give the same
answer: the cache is `profiles_of` applied to the same files); one that is not valid or
cannot be read leaves the last good cache serving every uid, the tenant whose own file
is broken included. That is what the running supervisor still applies (it refuses such
a reload), one broken drop-in must not stop every tenant's mail, and the problem is the
operator's to see (`nsmail check`, the supervisor's log), not a tenant's web app's.

Security: the cache is trusted as much as the configuration. It is used only when it is
a regular file owned by the owner of the configuration file and writable by no one else;
that check comes first, as marshal is not meant for data from someone untrusted.
Tenants' users read it (0644), as they read the configuration; it holds nothing more.
A last good cache may still grant what a broken edit meant to take away (a sender rule,
a limit): the worker enforces the sender rule again with the configuration it runs, and
the limits are a brake on scripts, not a wall (see the README).
"""

from __future__ import annotations

import marshal
import os
import stat

from nsmail.core.addresses import same_domain
from nsmail.core.layout import DROPIN_DIR
from nsmail.submit.maildrop import write_all

TYPE_CHECKING = False  # the submission command must not import typing or the parser
if TYPE_CHECKING:
    from nsmail.core.config import Config, DeliveryConfig, Tenant

    Stamp = list[list[str | int]]
    Fields = tuple[str, str, int, int, bool, bool, int, int, tuple[str, ...]]

SUFFIX = ".submission.cache"
_FORMAT = 2  # of the cache's contents; a cache of another format is not used
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
        "users",
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
        users: tuple[str, ...],  # the local mailboxes of `domain`
    ) -> None:
        self.domain = domain
        self.spool = spool
        self.uid = uid
        self.gid = gid
        self.is_host = is_host
        self.foreign_senders = foreign_senders
        self.message_size_limit = message_size_limit
        self.queue_size_limit = queue_size_limit
        self.users = users

    def fields(self) -> Fields:
        return (
            self.domain,
            self.spool,
            self.uid,
            self.gid,
            self.is_host,
            self.foreign_senders,
            self.message_size_limit,
            self.queue_size_limit,
            self.users,
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
        users=tenant.users,
    )


class Profiles:
    """Every uid's profile, from the cache or from a configuration (`profiles_of`)."""

    __slots__ = ("current", "host", "uids")

    def __init__(self, host: Fields, uids: dict[int, Fields], current: bool) -> None:
        self.host = host  # of the users outside every tenant: the machine's own mail
        self.uids = uids
        self.current = current  # made from the files as they are now

    def of_uid(self, uid: int) -> Profile:
        return Profile(*self.uids.get(uid, self.host))

    def of_domain(self, domain: str) -> Profile | None:
        """The tenant (never the host) of that domain, as `--tenant` names it."""
        tenants = (Profile(*fields) for fields in self.uids.values())
        return next((p for p in tenants if same_domain(p.domain, domain) and not p.is_host), None)


def profiles_of(config: Config) -> Profiles:
    """What the cache holds for `config`: a profile for the host and every tenant."""
    from nsmail.core.config import host_identity  # root's side, or a submission without a cache

    identities = (host_identity(config), *config.tenants)
    uids = {t.uid: profile_of(t, config.delivery).fields() for t in identities}
    return Profiles(uids[config.host.uid], uids, current=True)


def cached(config_path: str) -> Profiles | None:
    """The cache beside the configuration, current or not; None when there is no usable one."""
    try:
        owner = os.stat(config_path).st_uid
        fd = os.open(config_path + SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != owner or info.st_mode & 0o022:
                return None
            cache = marshal.loads(f.read(1 << 24))
        if cache["format"] != _FORMAT:
            return None
        Profile(*cache["host"])  # a cache of another shape fails here, not in the caller
        return Profiles(cache["host"], cache["uids"], cache["stamp"] == stamp(config_path))
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None


def refresh(config_path: str) -> bool:
    """Write the cache for the configuration at `config_path` (root); False when the
    files changed while they were read, or do not make a valid configuration (the last
    good cache then stays)."""
    from pathlib import Path

    from nsmail.core.config import ConfigError  # root's side only
    from nsmail.host.configfile import load

    before = stamp(config_path)
    try:
        config = load(Path(config_path))
    except ConfigError:
        return False
    if stamp(config_path) != before:
        return False
    profiles = profiles_of(config)
    cache = {"format": _FORMAT, "stamp": before, "host": profiles.host, "uids": profiles.uids}
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
