"""Entering network namespaces: setns(2) through libc, and nothing else.

Apart from `nsmail.root.netns`, which builds namespaces over netlink (pyroute2): the
zygote and every child it forks enter a namespace without ever loading a netlink library,
and the zygote forks before the supervisor has loaded one (`nsmail.root.children`).

Security: runs as root (CAP_SYS_ADMIN) in the supervisor, the zygote and its children
before their jail; paths come from the configuration, never from a tenant.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Loaded at import time: a forked child then loads (and copies) nothing to enter its
# namespace.
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
OWN_NAMESPACE = "/proc/thread-self/ns/net"


def check(result: int, what: str) -> None:
    """Raise OSError with errno for a libc call that returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, what: object) -> None:
    """Move the calling thread into the network namespace open as `fd`."""
    check(libc.setns(fd, CLONE_NEWNET), f"setns {what}")


def enter(path: Path) -> None:
    """Move the calling (single-threaded) process into the namespace at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, path)
    finally:
        os.close(fd)


@contextmanager
def coming_back() -> Iterator[None]:
    """Whatever namespace the block enters, come back to this one after it."""
    home = os.open(OWN_NAMESPACE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield
    finally:
        setns(home, "back")
        os.close(home)


@contextmanager
def inside(path: Path) -> Iterator[None]:
    """Run the block in the namespace at `path`, then come back."""
    with coming_back():
        enter(path)
        yield
