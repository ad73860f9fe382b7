"""A minimal inotify(7) binding: a descriptor that becomes readable when files arrive.

The worker only needs to know *that* something arrived (then it scans), so events are
drained, not decoded into names.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# The symbols come from the running process, so no library file is opened (none exists
# inside the worker's chroot).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class Watch:
    """A non-blocking inotify descriptor watching directories for new entries."""

    def __init__(self, directories: Iterable[str | os.PathLike[str]]) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        try:
            for directory in directories:
                mask = IN_MOVED_TO | IN_CREATE
                _check(_libc.inotify_add_watch(self.fd, os.fsencode(directory), mask))
        except OSError:
            os.close(self.fd)
            raise

    def drain(self) -> bool:
        """Whether anything happened since the last call."""
        seen = False
        while True:
            try:
                seen = bool(os.read(self.fd, 64 * 1024)) or seen
            except BlockingIOError:
                return seen

    def close(self) -> None:
        os.close(self.fd)


def _check(result: int) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result
