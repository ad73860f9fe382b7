"""A tenant's delivery history: its events (`nsmail.core.events`), kept in its own spool.

The worker appends one JSON line per recipient and attempt to `history/events` in the
spool; past `MAX_FILE` bytes that file becomes `history/events.1` (one rename, replacing
the older one), so a tenant keeps at most twice that. `nsmail log` reads both back, with
the tenant's rights, so a tenant's user can follow its own mail without the host's
journal (as cPanel's Track Delivery). A history is not mail: it is written without
fsync, and a failure to write it (a full disk, a quota) is logged once and never stops
a delivery.

Security: runs as the tenant uid (the worker in its jail, `nsmail log` as the tenant's
user or in root's child dropped to it). The directory and files are the tenant's to
change: they are opened without following symlinks or blocking (a FIFO), only regular
files are read or written, every line is bounded and decoded as hostile
(`events.decode`), and what does not decode is skipped.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from nsmail.core import events
from nsmail.core.layout import HISTORY

log = logging.getLogger("nsmail.tenant.history")

MAX_FILE = 4 << 20  # bytes of `events` before it is rotated: about 12,000 attempts
CURRENT = "events"
PREVIOUS = "events.1"
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class History:
    """The history under one spool root (`/var/spool/nsmail` inside the jail)."""

    def __init__(self, spool_root: Path) -> None:
        self.directory = spool_root / HISTORY
        self._failing = False  # said once, until a write succeeds again
        # Kept open between events (an open and a close per delivery cost more than the
        # line), and opened again once the tenant unlinked it or it was rotated.
        self._fd: int | None = None

    def record(self, event: events.Event) -> None:
        """Append `event`; a failure is logged, never raised."""
        line = (events.encode(event) + "\n").encode()
        try:
            self._append(line)
        except OSError as e:
            self._close()
            if not self._failing:
                log.warning("cannot write the delivery history in %s: %s", self.directory, e)
            self._failing = True
            return
        self._failing = False

    def _append(self, line: bytes) -> None:
        fd, info = self._current()
        if info.st_size and info.st_size + len(line) > MAX_FILE:
            os.rename(self.directory / CURRENT, self.directory / PREVIOUS)
            self._close()
            fd, _ = self._current()
        # One write(2) with O_APPEND: a line is never torn by another writer.
        os.write(fd, line)

    def _current(self) -> tuple[int, os.stat_result]:
        """The current file, open, and what fstat says of it: the one held, unless the
        tenant removed it (the lines would go nowhere), else opened now."""
        if self._fd is not None:
            info = _regular(self._fd)
            if info.st_nlink:
                return self._fd, info
            self._close()
        self.directory.mkdir(mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _OPEN
        self._fd = os.open(self.directory / CURRENT, flags, 0o600)
        return self._fd, _regular(self._fd)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self) -> Iterator[events.Event]:
        """Every event kept, oldest first; lines that are no event are skipped."""
        for name in (PREVIOUS, CURRENT):
            try:
                fd = os.open(self.directory / name, os.O_RDONLY | _OPEN)
            except FileNotFoundError:
                continue
            with open(fd, "rb") as file:
                _regular(file.fileno())
                while line := file.readline(events.MAX_LINE + 1):
                    if len(line) > events.MAX_LINE:  # no event: skip to the line's end
                        while line and not line.endswith(b"\n"):
                            line = file.readline(events.MAX_LINE + 1)
                        continue
                    event = events.decode(line)
                    if event is not None:
                        yield event


def _regular(fd: int) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{stat.filemode(info.st_mode)}: not a regular file")
    return info
