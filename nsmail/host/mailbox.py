"""The mailbox writer: one message appended to one user's mbox in /var/mail, then it exits.

The host's worker cannot write /var/mail (it runs as `host.user`, jailed in its queue),
and root must not parse mail, so the supervisor has its zygote fork this child for each
delivery (`nsmail.root.handoff`): jailed into the mail spool as the mailbox's owner (uid 0
for root's, with no capability) with the spool's group, as Debian's /var/mail
(drwxrwsr-x root:mail) lets group mail make mailboxes and dot-locks there. It locks the
mailbox as Debian's MTAs and MUAs do, with a dot-lock (`user.lock`) and an fcntl lock,
appends the entry (`nsmail.core.mbox`), fsyncs, and answers on its socket; a failed write
is cut off again, so a reader never sees half a message.

Security: runs jailed (nsmail.root.jail) with the mailbox owner's rights in the mail spool
and nothing else. The message comes from the host's worker, which parses it; this child
only copies it, quoting "From " lines, so no message can forge another's start. The
mailbox is opened without following a symlink and without blocking on a FIFO, and used
only if it is a regular file of its owner with one link (Postfix's checks).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial

from nsmail.core import mbox
from nsmail.host import handoffchild
from nsmail.submit.maildrop import write_pieces

LOCK_TRIES = 30  # one a second, for the dot-lock and the fcntl lock each
STALE_LOCK = 500.0  # seconds: a dot-lock this old was left by a crash (Postfix's stale_lock_time)


class Busy(Exception):
    """Someone else holds the mailbox's lock."""


def child(user: str, sender: str, fds: list[int]) -> Callable[[], None]:
    """The zygote's target: called with the message and the answer socket, before the jail."""
    content, answer = fds
    return partial(handoffchild.run, partial(_deliver_now, user, sender), content, answer)


def _deliver_now(user: str, sender: str, content: int) -> str:
    return deliver(user, sender, content, datetime.now().astimezone())


def deliver(user: str, sender: str, content: int, now: datetime) -> str:
    """Append the message in `content` to the mailbox `user` of the working directory;
    the answer, an RFC 3463 status and words."""
    try:
        with _dot_lock(user):
            _append(user, sender, content, now)
    except Busy:
        return f"4.2.0 the mailbox of {user} is locked; try again later"
    except OSError as e:
        code = {errno.EDQUOT: "4.2.2", errno.ENOSPC: "4.3.1"}.get(e.errno or 0, "4.2.0")
        where = f" ({e.filename})" if e.filename else ""
        return f"{code} the mailbox of {user}: {e.strerror or e}{where}"
    return f"2.0.0 delivered to the mailbox of {user}"


def _append(user: str, sender: str, content: int, now: datetime) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    fd = os.open(user, flags | os.O_CLOEXEC, 0o600)
    try:
        problem = _unsafe(os.fstat(fd))
        if problem is not None:
            raise OSError(errno.EPERM, problem)
        _retry(lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))
        start = os.fstat(fd).st_size
        try:
            message = handoffchild.pieces(content, handoffchild.size_of(content))
            write_pieces(fd, mbox.entry(sender, now, message))
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, start)  # the mailbox as it was: no half message in it
            raise
    finally:
        os.close(fd)  # the fcntl lock goes with it


def _unsafe(info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_nlink != 1:
        return "has more than one link"
    if info.st_uid != os.geteuid():
        return f"belongs to uid {info.st_uid}, not to its user"
    return None


@contextlib.contextmanager
def _dot_lock(user: str) -> Iterator[None]:
    """`user.lock`, made with O_EXCL as liblockfile makes it; one older than STALE_LOCK
    is removed first."""
    lock = f"{user}.lock"

    def take() -> None:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.lstat(lock).st_mtime > STALE_LOCK:
                    os.unlink(lock)
            raise BlockingIOError(errno.EAGAIN, "locked") from None
        with contextlib.suppress(OSError):
            os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)

    _retry(take)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)


def _retry(attempt: Callable[[], None]) -> None:
    """`attempt` until it does not find the lock taken (BlockingIOError), once a second."""
    for tries_left in reversed(range(LOCK_TRIES)):
        try:
            attempt()
            return
        except BlockingIOError:
            if not tries_left:
                raise Busy from None
            time.sleep(1)
