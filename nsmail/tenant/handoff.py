"""The worker's side of hand-offs (nsmail.core.handoff): a message it may not write itself,
given to the supervisor with a socket for the answer of the child that writes it.

The message is written to an unnamed file in the queue's tmp/ (O_TMPFILE: nothing to
clean up after a crash), which travels with the request as a descriptor; so does one end
of a fresh socket pair, on whose other end the worker awaits the answer. Whatever goes
wrong (no supervisor, a refusal, a child that dies) is an answer too, a temporary failure
at worst, so the mail waits in the queue and nothing is lost.

Security: runs as the tenant (or `host.user`) in its jail; the answer comes from a child
jailed as the mailbox's owner or the host's user, and is decoded strictly.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from nsmail.core.handoff import MAX_ANSWER, Answer, Request, decode_answer, encode_request
from nsmail.core.outcome import Status
from nsmail.submit.maildrop import write_pieces

ANSWER_TIMEOUT = 120.0  # seconds; the child has 100 (nsmail.host.handoffchild.DEADLINE)
IN_FLIGHT = 4  # at once, as the supervisor takes them (nsmail.root.handoff.MAX_IN_FLIGHT)


class Handoffs:
    """The worker's channel to the supervisor for hand-offs."""

    def __init__(self, channel: socket.socket, scratch: Path) -> None:
        self.channel = channel  # non-blocking
        self.scratch = scratch  # a directory for the unnamed message files
        self._room = asyncio.Semaphore(IN_FLIGHT)

    async def hand_off(self, request: Request, message: Iterable[bytes]) -> Answer:
        async with self._room:
            try:
                return await self._hand_off(request, message)
            except OSError as e:
                why = e.strerror or str(e)
                return Answer(Status.TEMPORARY, f"4.3.0 cannot hand the message off: {why}")

    async def _hand_off(self, request: Request, message: Iterable[bytes]) -> Answer:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine:
            with theirs:
                fd = os.open(self.scratch, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                try:
                    write_pieces(fd, message)
                    fds = [fd, theirs.fileno()]
                    socket.send_fds(
                        self.channel, [encode_request(request)], fds, socket.MSG_DONTWAIT
                    )
                finally:
                    os.close(fd)  # the request holds both now; the child, their only copies
            mine.setblocking(False)
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    data = await asyncio.get_running_loop().sock_recv(mine, MAX_ANSWER)
            except TimeoutError:
                data = b""
        return decode_answer(data)
