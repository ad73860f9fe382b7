"""The zygote: a pre-imported, idle process that forks jailed children on request.

A child forked from a process shares that process's memory until either side writes to
it. The supervisor keeps working (netlink, bookkeeping) and would slowly unshare every
worker's pages; the zygote is forked once, early in start-up, loads what its children run
(its prelude: the worker's modules, the CA store) while the supervisor goes on with its own
start on the other core, and then only forks, so a worker stays at about a megabyte of
private memory instead of several.

Each child is forked twice (zygote -> short-lived intermediate -> child) so that it is
re-parented to the supervisor, which is a child subreaper: the supervisor reaps its
workers and sees their exit status, and a worker's parent-death signal follows the
supervisor, not the zygote.

Security: runs as root. Requests come only from the supervisor, over a socketpair made
before the fork; they may be pickles for that reason and no other. The prelude reads
only modules and host files (the CA store, resolv.conf), never a tenant's. The child closes
every inherited descriptor except the ones it was sent, enters the tenant's network
namespace, prepares what it needs from the host file system, and is then jailed
(`nsmail.root.jail.enter`) before it reads any tenant data. Any failure on the way ends the
child; it never runs unjailed.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import prctl

from nsmail.core.exitcodes import EX_SOFTWARE
from nsmail.root import setns
from nsmail.root.jail import Identity, enter

MAX_REQUEST = 1 << 20
MAX_FDS = 16

# Called in the child with the descriptors it was given, before the jail (it may read
# host files); returns the main function to run once jailed. Must be picklable: a
# module-level function or a functools.partial of one.
Target = Callable[[list[int]], Callable[[], None]]


class SpawnError(OSError):
    """The zygote could not start a child."""


@dataclass(frozen=True, slots=True)
class Request:
    title: str
    identity: Identity
    netns_path: Path | None
    target: Target


# Told the pid of the started child, or why it could not start.
Done = Callable[[int | SpawnError], None]


class Zygote:
    """The supervisor's handle on its zygote process.

    Requests are asynchronous: the zygote forks while the supervisor goes on building
    the next tenant's namespace, and replies come back in request order.
    """

    def __init__(self, prelude: Callable[[], object] | None = None) -> None:
        # Run in each zygote before it serves. Should it fail, the zygote serves anyway:
        # each child then loads for itself what it runs, and fails on its own if it must.
        self._prelude = prelude
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self._pending: deque[Done] = deque()

    def start(self) -> int:
        """Fork the zygote from the current (single-threaded) process."""
        # Children re-parented away from the zygote's intermediates come to us.
        prctl.set_child_subreaper(1)
        supervisor = os.getpid()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = EX_SOFTWARE
            try:
                mine.close()
                _reset_signals()
                _close_all_but([theirs.fileno()])
                prctl.set_pdeathsig(signal.SIGKILL)
                prctl.set_name("nsmail zygote")
                self._load()
                gc.freeze()  # no collector will touch (and copy) what exists now
                _serve(theirs, supervisor)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.sock, self.pid = mine, pid
        return pid

    def _load(self) -> None:
        if self._prelude is None:
            return
        try:
            self._prelude()
        except Exception as e:
            # To descriptor 2 itself: sys.stderr may be a stream over one just closed.
            os.write(2, f"nsmail: zygote: {type(e).__name__}: {e}\n".encode())

    def close(self) -> None:
        """End the zygote (it exits when its socket closes); reaping `pid` is the caller's."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._fail_pending()

    def _fail_pending(self) -> None:
        while self._pending:
            self._pending.popleft()(SpawnError("the zygote stopped"))

    def request(
        self,
        title: str,
        identity: Identity,
        netns_path: Path | None,
        fds: Sequence[int],
        target: Target,
        done: Done,
    ) -> None:
        """Ask for a jailed child that keeps only stdio and `fds`; `done` hears the result.

        The descriptors travel with the request: the caller may close its copies now.
        """
        if self.sock is None:
            done(SpawnError("the zygote is not running"))
            return
        payload = pickle.dumps(Request(title, identity, netns_path, target))
        try:
            socket.send_fds(self.sock, [payload], list(fds))
        except OSError as e:
            done(SpawnError(f"cannot reach the zygote: {e}"))
            return
        self._pending.append(done)

    def collect(self, *, block: bool = False) -> bool:
        """Hand every reply that has arrived to its `done` (with `block`, wait for one).

        Returns False once the zygote has gone away (then `close` it); its pending
        requests have failed.
        """
        assert self.sock is not None
        flags = 0 if block else socket.MSG_DONTWAIT
        while self._pending:
            try:
                reply = self.sock.recv(256, flags).decode()
            except BlockingIOError:
                return True
            except OSError:
                reply = ""
            if not reply:
                self._fail_pending()
                return False
            done = self._pending.popleft()
            done(int(reply) if reply.isdigit() else SpawnError(reply))
            flags = socket.MSG_DONTWAIT
        return True


def _serve(sock: socket.socket, supervisor: int) -> None:
    while True:
        try:
            payload, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        except OSError:
            return
        if not payload:
            return  # the supervisor closed its end
        try:
            _fork_child(sock, pickle.loads(payload), fds, supervisor)
        finally:
            for fd in fds:
                os.close(fd)


def _fork_child(sock: socket.socket, request: Request, fds: list[int], supervisor: int) -> None:
    intermediate = os.fork()
    if intermediate == 0:
        try:
            pid = os.fork()
            if pid == 0:
                _become(request, fds, supervisor)
            sock.send(str(pid).encode())
        except BaseException as e:
            sock.send(f"cannot fork {request.title}: {e}".encode())
        finally:
            os._exit(0)
    os.waitpid(intermediate, 0)


def _become(request: Request, fds: list[int], supervisor: int) -> None:
    code = EX_SOFTWARE
    try:
        _close_all_but(fds)
        prctl.set_name(request.title[:15])
        if request.netns_path is not None:
            setns.enter(request.netns_path)
        main = request.target(fds)
        enter(request.identity, supervisor)
        main()
        code = 0
    except BaseException as e:  # the child must end here whatever happened
        print(f"nsmail: {request.title}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
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
