"""Fork jailed children (tenant workers, the DNS relay) from the pre-imported supervisor.

Forking the supervisor, which imported everything at start, costs a child about a
megabyte of private memory; a fresh interpreter per tenant would cost tens.

Security: runs as root. The child closes every inherited descriptor except the ones it
is given, enters the tenant's network namespace, prepares what it needs from the host
file system, and is then jailed (`nsmail.jail.enter`) before any tenant data is read.
Any failure before or during the jail ends the child; it never runs unjailed.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import prctl
from pyroute2 import netns

from nsmail.jail import EX_SOFTWARE, Identity, enter

# prepare() runs before the jail (it may read host files) and returns the jailed main.
Prepare = Callable[[], Callable[[], None]]


def spawn(
    title: str,
    identity: Identity,
    netns_path: Path | None,
    keep: Sequence[socket.socket],
    prepare: Prepare,
) -> int:
    """Fork a child that becomes `identity` and runs what `prepare` returns; return its pid."""
    parent = os.getpid()
    # Objects that exist now are never collected in the child, so the collector does
    # not dirty (and copy) the pages they share with the supervisor.
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    code = EX_SOFTWARE
    try:
        _reset_signals()
        _close_all_but([s.fileno() for s in keep])
        prctl.set_name(title[:15])
        if netns_path is not None:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            netns.setns(fd, flags=0, fork=False)
            os.close(fd)
        main = prepare()
        enter(identity, parent)
        main()
        code = 0
    except BaseException as e:  # the child must end here whatever happened
        print(f"nsmail: {title}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def _close_all_but(keep: Sequence[int]) -> None:
    lowest = 3
    for fd in sorted(set(keep)):
        if fd >= lowest:
            os.closerange(lowest, fd)
            lowest = fd + 1
    os.closerange(lowest, os.sysconf("SC_OPEN_MAX"))
