"""What a submitter does to a queue: make its directories, measure it, drop a message in.

`nsmail-sendmail` runs once per message, and a Python start is mostly imports: this module
(and the rest of the submission path, see `nsmail.submit.sendmail`) uses only modules built into
the interpreter, never pathlib, dataclasses, typing or re, which cost more than the
submission's own work. `nsmail.tenant.spool` builds the rest of the queue on these functions;
the state names are `nsmail.core.layout`'s; paths here are plain strings.

Security: run by the tenant's sendmail (as the tenant user, no chroot) and by its worker.
Files are created with O_EXCL and O_NOFOLLOW, so a name planted by the tenant is never
followed; queue ids come from `new_queue_id` or the caller's check.
"""

from __future__ import annotations

import os

from nsmail.core.layout import FLUSH_TRIGGER, MAILDROP, STATES, TMP

TYPE_CHECKING = False  # typing and collections.abc cost a start more than this module
if TYPE_CHECKING:
    from collections.abc import Iterable

WRITE_BUFFER = 1 << 20  # a message streamed in small pieces is written in pieces this big


def new_queue_id(now: float) -> str:
    """Sortable by arrival, unique without coordination: microseconds, then randomness."""
    return f"{int(now * 1_000_000):014x}{os.urandom(4).hex()}"


def create(root: str, *, public_maildrop: bool = False) -> None:
    """Make the state directories (0700) if they are missing.

    A public maildrop (the host's queue) takes files from every local user, like /tmp but
    unlistable: mode 1733. The sticky bit keeps users from removing each other's files;
    the owner of the directory (the host worker) takes them all.
    """
    for name in (TMP, *STATES):
        os.makedirs(os.path.join(root, name), mode=0o700, exist_ok=True)
    if public_maildrop:
        os.chmod(os.path.join(root, MAILDROP), 0o1733)


def size(root: str) -> int:
    """Bytes held by the queue's files, in every state (quarantined ones too)."""
    total = 0
    for state in (TMP, *STATES):
        try:
            with os.scandir(os.path.join(root, state)) as entries:
                for entry in entries:
                    try:
                        total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # delivered or moved while we counted
        except FileNotFoundError:
            continue
    return total


def drop(root: str, queue_id: str, pieces: Iterable[bytes], mode: int) -> None:
    """Submit: durably store `pieces` as maildrop/`queue_id` (sendmail's one write).

    Written under a dot name in maildrop itself (the submitter may have no other writable
    directory), fsynced, renamed, and the rename made durable: when this returns the
    message survives a crash; a failure leaves no file behind.
    """
    directory = os.path.join(root, MAILDROP)
    final = os.path.join(directory, queue_id)
    partial = os.path.join(directory, "." + queue_id)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(partial, flags, 0o600)
    try:
        os.fchmod(fd, mode)  # the umask of a cron job or web app must not decide
        write_pieces(fd, pieces)
        os.fsync(fd)
        os.rename(partial, final)
        try:
            sync_directory(directory)
        except PermissionError:
            # The host's public maildrop cannot be opened (it is not listable), so flush
            # the whole file system, which holds the rename too.
            _syncfs(fd)
    except BaseException:
        unlink_quietly(partial)
        raise
    finally:
        os.close(fd)


def request_flush(root: str) -> None:
    """Ask the worker to retry deferred mail now (`sendmail -q`)."""
    create(root)
    fd = os.open(os.path.join(root, FLUSH_TRIGGER), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until everything is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_pieces(fd: int, pieces: Iterable[bytes]) -> None:
    """Write `pieces` through a buffer: a message streamed in small pieces costs few writes."""
    buffered: list[bytes] = []
    length = 0
    for piece in pieces:
        buffered.append(piece)
        length += len(piece)
        if length >= WRITE_BUFFER:
            write_all(fd, b"".join(buffered))
            buffered, length = [], 0
    write_all(fd, b"".join(buffered))


def sync_directory(path: str) -> None:
    """Make the renames and creations in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:  # noqa: SIM105 (contextlib imports collections and functools: 3 ms per start)
        os.unlink(path)
    except OSError:
        pass


def _syncfs(fd: int) -> None:
    import ctypes  # only here: sendmail for the machine's own users

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
