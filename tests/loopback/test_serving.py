"""Request/reply connections served from an event loop: nothing a client does or fails to do
blocks the loop, and every connection is bounded (size, deadline, count)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nsmail.root import serving
from nsmail.root.serving import MAX_CONNECTIONS, TIMEOUT, Server

MAX_REQUEST = 64


class Loop:
    """A selector and a server on a Unix socket, with the loop turned by hand."""

    def __init__(self, path: Path, answer: serving.Answer) -> None:
        self.path = path
        self.selector = selectors.DefaultSelector()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(64)
        self.server = Server(listener, self.selector, answer, b"\n", MAX_REQUEST)
        self.clients: list[socket.socket] = []

    def turn(self, timeout: float = 0.05) -> None:
        """One pass of the loop, as the supervisor's: never blocks longer than `timeout`."""
        for key, _ in self.selector.select(timeout):
            key.data()

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.clients.append(client)
        client.connect(str(self.path))
        self.turn()
        return client

    def reply(self, client: socket.socket) -> bytes:
        """Everything the server sends until it closes, turning the loop meanwhile."""
        client.setblocking(False)
        received = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.turn(0.01)
            try:
                chunk = client.recv(1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                return received
            received += chunk
        raise AssertionError("the server never finished its reply")


def is_open(client: socket.socket) -> bool:
    try:
        return client.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Callable[[serving.Answer], Loop]]:
    made: list[Loop] = []

    def make(answer: serving.Answer) -> Loop:
        made.append(Loop(tmp_path / f"s{len(made)}", answer))
        return made[-1]

    yield make
    for each in made:
        each.server.close()
        for client in each.clients:
            client.close()


def echo(peer: socket.socket, request: bytes) -> bytes:
    return b"<" + request + b">"


def test_a_request_that_comes_in_pieces_is_answered_once_whole(
    loop: Callable[[serving.Answer], Loop],
) -> None:
    served = loop(echo)
    client = served.connect()
    client.sendall(b"hel")
    served.turn()
    client.sendall(b"lo\nignored")
    assert served.reply(client) == b"<hello>"


def test_idle_clients_do_not_hold_up_the_others(loop: Callable[[serving.Answer], Loop]) -> None:
    served = loop(echo)
    idle = [served.connect() for _ in range(MAX_CONNECTIONS - 1)]
    for client in idle:
        client.sendall(b"half a requ")  # and never the rest
    busy = served.connect()
    busy.sendall(b"status\n")
    assert served.reply(busy) == b"<status>"
    assert all(is_open(client) for client in idle)


def test_a_new_connection_over_the_cap_drops_the_oldest(
    loop: Callable[[serving.Answer], Loop],
) -> None:
    served = loop(echo)
    idle = [served.connect() for _ in range(MAX_CONNECTIONS)]
    newest = served.connect()
    assert not is_open(idle[0])
    assert all(is_open(client) for client in idle[1:])
    newest.sendall(b"x\n")
    assert served.reply(newest) == b"<x>"


def test_connections_end_at_their_deadline(loop: Callable[[serving.Answer], Loop]) -> None:
    served = loop(echo)
    first = served.connect()
    assert served.server.next_deadline() <= time.monotonic() + TIMEOUT
    served.server.expire(time.monotonic())
    assert is_open(first)
    served.server.expire(time.monotonic() + TIMEOUT)
    assert not is_open(first)
    assert served.server.next_deadline() == float("inf")


def test_an_endless_request_is_cut_at_the_limit(loop: Callable[[serving.Answer], Loop]) -> None:
    seen: list[bytes] = []

    def record(peer: socket.socket, request: bytes) -> bytes:
        seen.append(request)
        return b"too long"

    served = loop(record)
    client = served.connect()
    client.sendall(b"x" * (MAX_REQUEST * 4))
    with contextlib.suppress(ConnectionResetError):  # closed with the rest unread
        served.reply(client)
    assert seen == [b"x" * MAX_REQUEST]
    assert served.server.next_deadline() == float("inf")  # nothing left open


def test_a_request_ended_by_the_client_is_answered(loop: Callable[[serving.Answer], Loop]) -> None:
    served = loop(echo)
    client = served.connect()
    client.sendall(b"no newline")
    client.shutdown(socket.SHUT_WR)
    assert served.reply(client) == b"<no newline>"


def test_a_large_reply_goes_out_as_the_client_reads(
    loop: Callable[[serving.Answer], Loop],
) -> None:
    page = bytes(range(256)) * 20000  # 5 MB: far more than a socket buffer
    served = loop(lambda peer, request: page)
    client = served.connect()
    client.sendall(b"all\n")
    served.turn()  # the first part is sent; the loop does not wait for the rest
    assert served.reply(client) == page


def test_an_answer_that_raises_ends_its_connection(loop: Callable[[serving.Answer], Loop]) -> None:
    def broken(peer: socket.socket, request: bytes) -> bytes:
        raise RuntimeError("a bug")

    served = loop(broken)
    client = served.connect()
    client.sendall(b"x\n")
    with pytest.raises(RuntimeError):
        served.turn()  # the supervisor's loop logs it (Supervisor._dispatch)
    assert not is_open(client)
    assert served.server.next_deadline() == float("inf")
