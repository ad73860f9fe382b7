"""A minimal inotify(7) binding: watch one directory for files renamed into it."""

from __future__ import annotations

import ctypes
import os
import struct

IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name
_BUFFER = 64 * 1024

# The symbols come from the running process, so no library file is opened (none exists
# inside the worker's chroot).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class Watch:
    """A non-blocking inotify descriptor watching one directory for IN_MOVED_TO."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        try:
            _check(_libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_MOVED_TO))
        except OSError:
            os.close(self.fd)
            raise

    def read(self) -> tuple[list[str], bool]:
        """Names moved in since the last read, and whether events were lost (overflow)."""
        names: list[str] = []
        overflow = False
        while True:
            try:
                buffer = os.read(self.fd, _BUFFER)
            except BlockingIOError:
                return names, overflow
            offset = 0
            while offset + _EVENT.size <= len(buffer):
                _, mask, _, length = _EVENT.unpack_from(buffer, offset)
                offset += _EVENT.size
                name = buffer[offset : offset + length].rstrip(b"\0")
                offset += length
                overflow = overflow or bool(mask & IN_Q_OVERFLOW)
                if mask & IN_MOVED_TO and name:
                    names.append(os.fsdecode(name))

    def close(self) -> None:
        os.close(self.fd)


def _check(result: int) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result
