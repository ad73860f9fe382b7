"""A tenant's mail queue on disk: one file per message, one directory per state.

States (Postfix's, by name): `maildrop` (as submitted by sendmail), `incoming` (taken in
and waiting for an attempt: released or requeued mail, recovered mail), `active` (being
delivered), `deferred` (waiting for its next attempt, which is the file's modification
time; its headers are completed), `hold` (kept back by an operator), `corrupt`
(quarantined: damaged or hostile, never deleted). A message moves between states only by
rename(2). Every write is durable before it counts: the data is written under `tmp/` (a
submission: under a dot name in `maildrop/`, see `nsmail.submit.maildrop`, which also makes the
directories), fsynced, renamed into place, and the directory fsynced. Moves and removals
are not synced: if a crash undoes one, the message is found in its previous state and
tried again; that can repeat a delivery, never lose one.

Security: used by the tenant's jailed worker and its queue tools, and through
`nsmail.submit.maildrop` by the tenant's own sendmail (as the tenant user, no chroot); all run
as the tenant uid, so the files are the tenant's own and are treated as hostile by
whoever decodes them. Names come from `valid_queue_id` only.
Files are opened with O_NOFOLLOW so a planted symlink is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nsmail.core.layout import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    FLUSH_TRIGGER,
    HOLD,
    INCOMING,
    MAILDROP,
    SPOOL_IN_HOME,
    STATES,
    TMP,
)
from nsmail.core.message import Body, MemoryBody, chunks
from nsmail.core.queuefile import HEAD_BYTES, TRAILER_BYTES, Envelope, parse, valid_queue_id
from nsmail.submit import maildrop
from nsmail.submit.maildrop import new_queue_id, unlink_quietly, write_pieces

# The state names are the layout's, and are part of this module's interface too.
__all__ = [
    "ACTIVE",
    "CORRUPT",
    "DEFERRED",
    "HOLD",
    "INCOMING",
    "MAILDROP",
    "SPOOL_IN_HOME",
    "STATES",
    "TMP",
    "FileBody",
    "Spool",
    "new_queue_id",
]

_SMALL = 1 << 20  # files up to this size are read in one go; larger ones are streamed


@dataclass(frozen=True, slots=True)
class FileBody:
    """Bytes [start, start + length) of an open queue file (a `Body` kept out of memory),
    read with pread(2), which never moves the file offset; the caller owns the descriptor."""

    fd: int
    start: int
    length: int

    def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.length - offset))
        data = os.pread(self.fd, size, self.start + offset)
        if len(data) != size:  # the file shrank under us: never send a torn message
            raise OSError(errno.EIO, f"queue file changed while read ({len(data)} of {size})")
        return data

    def after(self, offset: int) -> FileBody:
        offset = min(offset, self.length)
        return FileBody(self.fd, self.start + offset, self.length - offset)


class Spool:
    """The queue directories under one root (`/var/spool/nsmail` inside the jail)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = str(root)  # the names of the hot path are strs: no Path per call

    def create(self, *, public_maildrop: bool = False) -> None:
        maildrop.create(self._root, public_maildrop=public_maildrop)

    def owner(self, state: str, queue_id: str) -> int:
        """The uid that owns a file: who submitted it (the kernel's word, not the file's)."""
        return os.lstat(self._name(state, queue_id)).st_uid

    def path(self, state: str, queue_id: str) -> Path:
        return Path(self._name(state, queue_id))

    def _name(self, state: str, queue_id: str) -> str:
        if not valid_queue_id(queue_id):
            raise ValueError(f"bad queue id {queue_id!r}")
        return f"{self._root}/{state}/{queue_id}"

    def put(self, state: str, queue_id: str, pieces: Iterable[bytes]) -> None:
        """Durably store `pieces` as `state`/`queue_id`, replacing a file of that name."""
        tmp = self._name(TMP, queue_id)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            write_pieces(fd, pieces)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(tmp)  # a full disk must leave no partial file behind
            raise
        os.close(fd)
        try:
            os.rename(tmp, self._name(state, queue_id))
        except BaseException:
            unlink_quietly(tmp)
            raise
        self._sync(state)

    def move(self, queue_id: str, source: str, target: str) -> None:
        """One rename from state to state."""
        os.rename(self._name(source, queue_id), self._name(target, queue_id))

    def remove(self, state: str, queue_id: str) -> None:
        os.unlink(self._name(state, queue_id))

    @contextlib.contextmanager
    def open_message(self, state: str, queue_id: str) -> Iterator[tuple[Envelope, Body, float]]:
        """The envelope, the body and the mtime (a deferred message's next attempt) of a
        queue file whose framing and checksum hold; raises OSError or QueueFileError.

        A small file is read whole; a larger one is checked as it streams through the
        hash and its body is left in the file (`FileBody`), open until the block ends.
        O_NOFOLLOW, O_NONBLOCK and the fstat check: a symlink, FIFO or device planted by
        the tenant is refused without blocking, never read.
        """
        fd, info = self._open_regular(state, queue_id)
        try:
            size = info.st_size
            if size <= _SMALL:
                data = _read_exactly(fd, 0, size)
                layout = parse(data[:HEAD_BYTES], data[-TRAILER_BYTES:], size)
                layout.verify(hashlib.sha256(memoryview(data)[: layout.checked]).digest())
                end = layout.body_start + layout.body_length
                body: Body = MemoryBody(data[layout.body_start : end])
            else:
                head = _read_exactly(fd, 0, min(size, HEAD_BYTES))
                layout = parse(head, _read_exactly(fd, size - TRAILER_BYTES, TRAILER_BYTES), size)
                digest = hashlib.sha256()
                for piece in chunks(FileBody(fd, 0, layout.checked)):
                    digest.update(piece)
                layout.verify(digest.digest())
                body = FileBody(fd, layout.body_start, layout.body_length)
            yield layout.envelope, body, info.st_mtime
        finally:
            os.close(fd)

    def _open_regular(self, state: str, queue_id: str) -> tuple[int, os.stat_result]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(self._name(state, queue_id), flags)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        return fd, info

    def ids(self, state: str) -> list[str]:
        """Queue ids in `state`, oldest first; names that are no queue id are skipped.

        So are directories in maildrop/: submissions are files, and one planted in the
        host's public maildrop could not even be quarantined (moving a directory elsewhere
        takes write access to it, which its owner keeps): it would be mail waiting for
        ever. Elsewhere the tenant's own worker can quarantine them, and does.
        """
        try:
            with os.scandir(self.root / state) as entries:
                return sorted(
                    entry.name
                    for entry in entries
                    if valid_queue_id(entry.name)
                    and not (state == MAILDROP and entry.is_dir(follow_symlinks=False))
                )
        except FileNotFoundError:
            return []

    def next_attempt(self, queue_id: str, latest: float) -> float | None:
        """A deferred message's next attempt time (its mtime), but never after `latest`
        (the mtime is the tenant's to set: see `schedule.latest_attempt`); None if it is gone.
        """
        try:
            return min(os.stat(self._name(DEFERRED, queue_id)).st_mtime, latest)
        except FileNotFoundError:
            return None

    def schedule(self, queue_id: str, state: str, when: float) -> None:
        """Record the next attempt time of a message (before the attempt, so a crash
        in the middle leads to a retry at that time, never a hot loop)."""
        os.utime(self._name(state, queue_id), (when, when))

    def recover(self) -> list[str]:
        """At start: messages left active by a crash go back to incoming (retried)."""
        stale = self.ids(ACTIVE)
        for queue_id in stale:
            self.move(queue_id, ACTIVE, INCOMING)
        for name in self.ids(TMP):
            unlink_quietly(self.root / TMP / name)  # never acknowledged, never counted
        for name in os.listdir(self.root / MAILDROP):
            partial = self.root / MAILDROP / name
            # A submission that died half-way (its sendmail got no success).
            with contextlib.suppress(FileNotFoundError):
                if name.startswith(".") and partial.lstat().st_mtime < time.time() - 3600:
                    unlink_quietly(partial)
        return stale

    def take_flush_request(self) -> bool:
        """Whether someone asked for a flush since the last call (`sendmail -q`)."""
        try:
            (self.root / FLUSH_TRIGGER).unlink()
        except FileNotFoundError:
            return False
        return True

    def request_flush(self) -> None:
        maildrop.request_flush(self._root)

    def _sync(self, state: str) -> None:
        maildrop.sync_directory(f"{self._root}/{state}")


def _read_exactly(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(errno.EIO, f"queue file changed while read ({len(data)} of {size} bytes)")
    return data
