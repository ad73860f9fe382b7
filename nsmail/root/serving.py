"""One request, one reply: connections served from the supervisor's loop without blocking it.

The control socket (`nsmail.root.control`) and the metrics endpoint (`nsmail.root.metrics`)
each read one request, up to a terminator and at most `max_request` bytes, and send one reply. Every
connection is non-blocking and registered in the supervisor's selector, and is read and
written only when the kernel says it is ready; each has a deadline for the whole exchange
(TIMEOUT), and at most MAX_CONNECTIONS are open per server: a new one makes room by
dropping the oldest, which is also the nearest its deadline. An idle or slow client so
costs a descriptor and a bounded buffer, never the loop's time.

Security: runs as root in the supervisor. A client is whoever can connect (any local user
for the metrics endpoint, tenants' users among them); the bounds above hold whatever it
sends or fails to read.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

TIMEOUT = 2.0  # seconds from accept to the last byte of the reply
MAX_CONNECTIONS = 16
_ACCEPTS_PER_WAKE = 32  # bounded work per wake-up, however fast clients connect

# The reply to a request (the bytes before the terminator, or the first max_request bytes
# of one that has none), given the client's socket for its credentials.
Answer = Callable[[socket.socket, bytes], bytes]


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    deadline: float  # monotonic
    received: bytearray = field(default_factory=bytearray)
    reply: memoryview | None = None  # what is left to send, once answered


class Server:
    """Serves the connections of one listening socket from `selector`.

    Registered handlers are plain callables, as the supervisor's loop calls them; the
    loop also asks for `next_deadline` and calls `expire`.
    """

    def __init__(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        answer: Answer,
        terminator: bytes,
        max_request: int,
    ) -> None:
        self.listener = listener
        self.selector = selector
        self.answer = answer
        self.terminator = terminator
        self.max_request = max_request
        # In accept order: the first is the oldest, and has the nearest deadline.
        self._open: dict[socket.socket, _Connection] = {}
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self._accept)

    def next_deadline(self) -> float:
        """When the oldest open connection must end (monotonic); inf with none open."""
        return next(iter(self._open.values())).deadline if self._open else float("inf")

    def expire(self, now: float) -> None:
        """End the connections whose deadline has passed."""
        while self._open and self.next_deadline() <= now:
            self._close(next(iter(self._open.values())))

    def close(self) -> None:
        for conn in list(self._open.values()):
            self._close(conn)
        self.selector.unregister(self.listener)
        self.listener.close()

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, _ = self.listener.accept()
            except OSError:  # none pending (BlockingIOError), or it left already
                return
            if len(self._open) >= MAX_CONNECTIONS:
                self._close(next(iter(self._open.values())))
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + TIMEOUT)
            self._open[sock] = conn
            self.selector.register(sock, selectors.EVENT_READ, partial(self._ready, conn))

    def _ready(self, conn: _Connection) -> None:
        if self._open.get(conn.sock) is not conn:
            return  # dropped by an earlier handler of the same wake-up
        try:
            if conn.reply is None:
                self._read(conn)
            else:
                self._write(conn)
        except OSError:
            self._close(conn)  # the client's trouble ends only its connection
        except Exception:
            self._close(conn)  # a failing answer must not leave a connection to spin on
            raise

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(self.max_request + 1 - len(conn.received))
        except BlockingIOError:
            return
        conn.received += chunk
        end = conn.received.find(self.terminator)
        if end < 0 and chunk and len(conn.received) <= self.max_request:
            return  # more to come
        request = bytes(conn.received[: end if end >= 0 else self.max_request])
        conn.reply = memoryview(self.answer(conn.sock, request))
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, partial(self._ready, conn))
        self._write(conn)  # most replies fit the socket buffer: done at once

    def _write(self, conn: _Connection) -> None:
        assert conn.reply is not None
        try:
            sent = conn.sock.send(conn.reply)
        except BlockingIOError:
            return
        conn.reply = conn.reply[sent:]
        if not conn.reply:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if self._open.pop(conn.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()
