"""The kernel's word on a local peer (nsmail.root.peers): SO_PEERCRED on a Unix socket,
sock_diag for loopback TCP, from clients that really are other uids."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest

from nsmail.root.peers import Diag, PeerUnknown, answer, request, unix_peer_uid

pytestmark = pytest.mark.needs("root")
NOBODY = 65534


def as_nobody(work: Callable[[], None]) -> int:
    """Run `work` in a child that is uid NOBODY; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            work()
        finally:
            os._exit(0)
    return pid


@pytest.mark.parametrize(
    "family, address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_tcp_peer_is_named_by_its_uid_while_connected(family: int, address: str) -> None:
    with socket.socket(family) as server:
        server.bind((address, 0))
        server.listen()
        port = server.getsockname()[1]
        r, w = os.pipe()

        def connect_and_wait() -> None:
            client = socket.create_connection((address, port))
            os.read(r, 1)  # until told to close
            client.close()

        pid = as_nobody(connect_and_wait)
        conn, _ = server.accept()
        diag = Diag()
        try:
            assert diag.tcp_peer_uid(conn) == NOBODY
            os.write(w, b"x")
            os.waitpid(pid, 0)
            time.sleep(0.1)
            # Closed: a FIN_WAIT/TIME_WAIT remnant, which sock_diag shows as uid 0.
            with pytest.raises(PeerUnknown):
                diag.tcp_peer_uid(conn)
        finally:
            diag.close()
            conn.close()


def test_a_unix_peer_is_named_by_so_peercred(tmp_path: object) -> None:
    path = f"/run/nsmail-test-peers-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o666)
        server.listen()
        try:
            pid = as_nobody(lambda: socket.socket(socket.AF_UNIX).connect(path))
            conn, _ = server.accept()
            os.waitpid(pid, 0)
            assert unix_peer_uid(conn) == NOBODY
            conn.close()
        finally:
            os.unlink(path)


def test_a_stale_or_foreign_reply_is_not_an_answer() -> None:
    wire = request(socket.AF_INET, ("127.0.0.1", 4711), ("127.0.0.1", 25), 7)
    assert len(wire) == 72
    assert answer(wire[:16].replace(b"\x07\x00\x00\x00", b"\x08\x00\x00\x00", 1), 7) is None
    with pytest.raises(PeerUnknown):
        answer(b"\x00" * 8, 7)
