"""What each hand-off child (nsmail.host.mailbox, nsmail.host.postmaster) does around its
one job: a deadline, the message read back from its descriptor, one answer on its socket.

Security: runs jailed, forked by the zygote (nsmail.root.handoff); the message descriptor
is the worker's and is only read, with pread, up to the size it had when it came.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator

from nsmail.core.handoff import encode_answer
from nsmail.core.message import CHUNK

DEADLINE = 100  # seconds: a hung file system ends the child (the worker waits 120)


def run(work: Callable[[int], str], content: int, answer: int) -> None:
    """Do `work` on the message `content`, and send what it says on `answer`."""
    signal.alarm(DEADLINE)  # SIGALRM's default ends the process: the worker sees no answer
    text = work(content)
    with socket.socket(fileno=answer) as channel, contextlib.suppress(OSError):
        channel.send(encode_answer(text))


def size_of(content: int) -> int:
    """The message's size; OSError when it is not a regular file."""
    info = os.fstat(content)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "the message is not a file")
    return info.st_size


def pieces(content: int, size: int) -> Iterator[bytes]:
    """The first `size` bytes of `content`, in chunks."""
    for offset in range(0, size, CHUNK):
        yield os.pread(content, min(CHUNK, size - offset), offset)
