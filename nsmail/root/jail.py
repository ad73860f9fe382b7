"""The jail: chroot, drop every privilege in a fixed order, then prove it from the kernel.

The Sendmail-era design only set the effective uid, which a process can take back. Here
real, effective and saved ids all change, supplementary groups go, the capability
bounding set is emptied and no_new_privs is set, so neither the process nor anything it
executes can regain root. The result is read back from /proc/self/status and the
process exits if any field is not what it must be (fail closed).

Security: called as root in a freshly forked child, before it runs any code that reads
tenant data. Order matters: the bounding set can only be cleared while the process still
has CAP_SETPCAP (before the uid change), and a uid change resets the parent-death signal.
The new root is reached one directory at a time without following any symlink, so a home
swapped for a link to another tenant's home (even between configuration load and this
start) ends the child instead of jailing it there.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import prctl

from nsmail.core.exitcodes import EX_SOFTWARE

ADOPTION_TIMEOUT = 5.0
_NEXT_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class JailError(Exception):
    """The jail could not be entered or did not hold; the process must not go on."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a jailed process becomes."""

    uid: int
    gid: int
    root: Path


def enter(identity: Identity, parent_pid: int) -> None:
    """Chroot and drop to `identity` for good; raises JailError if any check fails.

    `parent_pid` is the supervisor: the process dies with it (parent-death signal).
    """
    last_cap = last_capability()
    # /proc is not inside the chroot: keep the process's own /proc entry open to verify
    # the drop afterwards, and close it before any untrusted code runs.
    proc_fd = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        root_stat = chroot_into(identity.root)
        drop(identity.uid, identity.gid, last_cap)
        _wait_for_adoption(parent_pid)
        prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent_pid:
            raise JailError("the supervisor died during start-up")
        os.umask(0o077)
        status = _read_at(proc_fd, "status")
    finally:
        os.close(proc_fd)
    problems = check_status(status, identity.uid, identity.gid)
    here = os.stat("/")
    if (here.st_dev, here.st_ino) != (root_stat.st_dev, root_stat.st_ino):
        problems.append("root directory is not the jail")
    if problems:
        raise JailError("; ".join(problems))


def chroot_into(root: Path) -> os.stat_result:
    """chroot(2) into `root` and make it the working directory; what it is (its stat).

    Each component is opened from the one before with O_NOFOLLOW, and the chroot is of
    the last descriptor (fchdir, then chroot(".")): a symlink anywhere on the path, put
    there at any moment, fails the call (JailError) instead of being followed.
    """
    if not root.is_absolute() or ".." in root.parts:
        raise JailError(f"cannot enter {root}: not an absolute path without '..'")
    fd = os.open("/", _NEXT_DIRECTORY)
    reached = Path("/")
    try:
        for part in root.parts[1:]:
            reached /= part
            following = os.open(part, _NEXT_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = following
        os.fchdir(fd)
        os.chroot(".")
        return os.fstat(fd)
    except OSError as e:
        # O_NOFOLLOW with O_DIRECTORY refuses a symlink with ENOTDIR (ELOOP without it).
        symlink = e.errno in (errno.ENOTDIR, errno.ELOOP)
        problem = "a symbolic link or not a directory" if symlink else e.strerror
        raise JailError(f"cannot enter {root}: {reached}: {problem}") from None
    finally:
        os.close(fd)


def last_capability() -> int:
    """The highest capability number the kernel knows (read before any chroot)."""
    return int(_read_at(None, "/proc/sys/kernel/cap_last_cap"))


def drop(uid: int, gid: int, last_cap: int | None = None) -> None:
    """Become uid:gid for good: no capabilities (bounding set included, so nothing
    executed later gets any back), no_new_privs, no groups, real/effective/saved ids.

    A caller that chroots first passes `last_cap` (`last_capability()` read before):
    after a chroot into a tenant home, the tenant decides what /proc/sys there holds.
    """
    if last_cap is None:
        last_cap = last_capability()
    for cap in range(last_cap + 1):  # only possible before the uid change (CAP_SETPCAP)
        prctl.capbset_drop(cap)
    prctl.cap_inheritable.limit()
    prctl.set_no_new_privs(1)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A uid that stays 0 keeps its capabilities (the writer of root's mailbox is jailed as
    # uid 0): none are left, and with the bounding set empty no program brings them back.
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    # No core dumps and no ptrace by the same uid (a tenant's own shell, say): said
    # explicitly, not left to the fs.suid_dumpable setting.
    prctl.set_dumpable(0)


def _wait_for_adoption(parent_pid: int) -> None:
    # Forked through a short-lived intermediate (see nsmail.root.spawn), the process belongs
    # to the supervisor only once that intermediate has exited.
    deadline = time.monotonic() + ADOPTION_TIMEOUT
    while os.getppid() != parent_pid:
        if time.monotonic() > deadline:
            raise JailError(f"not adopted by the supervisor (parent is {os.getppid()})")
        time.sleep(0.001)


def _read_at(dir_fd: int | None, path: str) -> str:
    # Plain system calls: every Python object a worker creates here costs it memory
    # that it would otherwise share with its siblings.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def check_status(status: str, uid: int, gid: int) -> list[str]:
    """What is wrong with a /proc/PID/status for a process jailed as uid:gid (pure)."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    expected: dict[str, Callable[[str], bool]] = {
        # real, effective, saved set, filesystem
        "Uid": lambda v: v.split() == [str(uid)] * 4,
        "Gid": lambda v: v.split() == [str(gid)] * 4,
        "Groups": lambda v: v.split() == [],
        "NoNewPrivs": lambda v: v.strip() == "1",
        **{name: _is_zero_mask for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    }
    problems = []
    for name, ok in expected.items():
        value = fields.get(name)
        if value is None or not ok(value.strip()):
            problems.append(f"{name} is {value.strip() if value else 'missing'!r}")
    return problems


def _is_zero_mask(value: str) -> bool:
    return value != "" and set(value) == {"0"}


def run_as(uid: int, gid: int, action: Callable[[], None]) -> int:
    """Run `action` in a child that dropped to uid:gid for good; its exit status.

    For root's one-off actions on tenant-owned files (a tenant can plant symlinks
    there): they happen with the tenant's own rights, never with root's.
    """
    pid = os.fork()
    if pid == 0:
        code = EX_SOFTWARE
        try:
            drop(uid, gid)
            action()
            code = 0
        except BaseException as e:
            print(f"nsmail: as uid {uid}: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
