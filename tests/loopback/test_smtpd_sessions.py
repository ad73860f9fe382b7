"""The worker's side of SMTP sessions (nsmail.tenant.smtpd) over a real session channel:
a local session is greeted and stored as nsmail-sendmail stores a message, one the front
authenticated goes on without a greeting, a handoff that is no handoff is refused, and a
client over its limit gets 421 while the others are served."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nsmail.core import queuefile, sessionhandoff
from nsmail.submit import maildrop
from nsmail.submit.submission import Profile
from nsmail.tenant.smtpd import Limits, Sessions


class Served:
    """A Sessions object, its supervisor end, and the threads it started."""

    def __init__(self, spool: Path, limits: Limits) -> None:
        maildrop.create(str(spool))
        profile = Profile("bcd.test", str(spool), os.getuid(), os.getgid(), False, False, 0, 0, ())
        self.supervisor, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.threads: list[threading.Thread] = []
        self.clients: list[socket.socket] = []
        self.sessions = Sessions(worker, profile, {4000: "alice"}, limits, spawn=self._spawn)

    def _spawn(self, work: Callable[[], None]) -> None:
        thread = threading.Thread(target=work)
        thread.start()
        self.threads.append(thread)

    def hand(self, given: sessionhandoff.Handoff | bytes) -> socket.socket:
        """Hand the worker a session; the client's end."""
        client, server = socket.socketpair()
        data = given if isinstance(given, bytes) else sessionhandoff.encode(given)
        socket.send_fds(self.supervisor, [data], [server.fileno()])
        server.close()
        self.sessions.on_readable()
        client.settimeout(10)
        self.clients.append(client)
        return client

    def join(self) -> None:
        for thread in self.threads:
            thread.join(10)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.join()
        self.supervisor.close()
        self.sessions.channel.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "spool", Limits(timeout=5, client_limit=1, session_limit=2))
    yield s
    s.close()


def talk(client: socket.socket, *lines: bytes) -> list[str]:
    """Send each line (b"": nothing) and read one reply after it: its last line."""
    replies = []

    with client.makefile("rb") as f:

        def reply() -> str:
            got = f.readline()
            while got[3:4] == b"-":
                got = f.readline()
            return got.decode().strip()

        for line in lines:
            if line:
                client.sendall(line)
            replies.append(reply())
    return replies


MESSAGE = (
    b"MAIL FROM:<alice@bcd.test>\r\n",
    b"RCPT TO:<x@rcpt.test>\r\n",
    b"DATA\r\n",
    b"Subject: hi\r\n\r\nhello\r\n.\r\n",
    b"QUIT\r\n",
)


def test_a_local_session_is_greeted_and_stored_with_its_login(
    served: Served, tmp_path: Path
) -> None:
    client = served.hand(sessionhandoff.Handoff("uid 4000 from [127.0.0.1]:4711", uid=4000))
    replies = talk(client, b"", b"EHLO app.test\r\n", *MESSAGE)
    assert replies[0] == "220 bcd.test ESMTP nsmail"
    assert replies[5].startswith("250 2.0.0 Ok: queued as ") and replies[6].startswith("221")
    served.join()
    (name,) = os.listdir(tmp_path / "spool" / "maildrop")
    envelope, body = queuefile.decode((tmp_path / "spool" / "maildrop" / name).read_bytes())
    assert (envelope.sender, envelope.recipients, envelope.submitter) == (
        "alice@bcd.test",
        ("x@rcpt.test",),
        "alice",
    )
    assert body == b"Subject: hi\r\n\r\nhello\r\n"


def test_an_authenticated_session_goes_on_without_a_greeting(served: Served) -> None:
    client = served.hand(sessionhandoff.Handoff("[203.0.113.9]:5000", user="alice@bcd.test"))
    replies = talk(client, *MESSAGE)
    assert replies[0] == "250 2.1.0 Ok" and replies[3].startswith("250 2.0.0 Ok: queued as ")


def test_no_handoff_no_session(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    client = served.hand(b'{"client": "x", "uid": 0, "user": "root@bcd.test"}')
    assert client.recv(100) == b""  # closed unread
    assert "refused a session handoff: neither or both of uid and user" in caplog.text


def test_over_its_limit_a_client_gets_421_and_the_others_are_served(served: Served) -> None:
    first = served.hand(sessionhandoff.Handoff("uid 4000", uid=4000))
    assert talk(first, b"")[0].startswith("220")
    second = served.hand(sessionhandoff.Handoff("uid 4000", uid=4000))
    assert talk(second, b"") == ["421 4.7.0 bcd.test too many sessions from you; try again later"]
    other = served.hand(sessionhandoff.Handoff("uid 4001", uid=4001))
    assert talk(other, b"") == ["220 bcd.test ESMTP nsmail"]
    third = served.hand(sessionhandoff.Handoff("uid 4002", uid=4002))  # 2 in all are open
    assert talk(third, b"")[0].startswith("421 4.7.0 bcd.test too many sessions;")
    first.sendall(b"QUIT\r\n")
    other.sendall(b"QUIT\r\n")
    served.join()
    assert served.sessions.active == 0
