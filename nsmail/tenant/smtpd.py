"""SMTP sessions the supervisor hands a tenant's worker, served as `sendmail -bs` serves one.

The supervisor accepts a connection on a local listener and asks the kernel whose it is
(`nsmail.root.listener`), or the submission front hands it one whose client
authenticated on 587 or 465 (`nsmail.host.submission`); either way the connection
reaches the worker of the tenant it belongs to over the worker's session channel, a
`Handoff` datagram with the socket beside it (SCM_RIGHTS). Each session runs in a thread
of its own over the blocking socket, through `nsmail.submit.sendmail_smtp.serve`: the
sender rule, queue and size limits and refusals of `nsmail-sendmail`, the same maildrop
file, 250 only once the message is on disk; the worker's queue manager then takes it as
any submission (headers completed, sending limits, DKIM). A thread, not the event loop:
that code is the submission's own, blocking and streaming, and a session spends its
time waiting for its client and on fsync, both of which release the GIL.

A local session is greeted here; one from the front goes on after its AUTH (the front
greeted, encrypted and authenticated it, and passes the plain text through). A message
with a bare LF or CR is refused (550 5.5.2, SMTP smuggling). At most `session_limit`
sessions at once and `client_limit` per client (a uid, or an authenticated user); over
them a connection gets 421 4.7.0 and is closed. A client must send each command within
`timeout` of the reply before it, and wait no longer than that between reads of a
message; then it gets 421 4.4.2 and the session ends (a message not complete is not
queued).

Security: runs as the tenant in its jail. Who the client is comes from the supervisor
(the kernel's word on a local peer's uid, or the user the front authenticated), never
from the client; a local uid that is not the tenant's (the host's worker serves every
other local user) is named by the passwd map read before the jail. What the client
sends reaches the protocol core and the tenant's own maildrop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nsmail.core import sessionhandoff
from nsmail.core.smtp import server as smtp
from nsmail.submit.sendmail_smtp import Gone, serve
from nsmail.submit.submission import Profile

log = logging.getLogger("nsmail.tenant.smtpd")

_CHUNK = 1 << 16
_PER_WAKE = 32  # datagrams taken per wake-up of the channel


@dataclass(frozen=True, slots=True)
class Limits:
    timeout: float  # seconds per command, and per read of a message
    client_limit: int  # sessions at once per client
    session_limit: int  # sessions at once in all


class SocketConnection:
    """A session's socket with RFC 5321 4.5.3.2's server timeout: no read waits longer
    than `timeout`, and a command must be complete within `timeout` of the reply before
    it (checked at each read, so a client that trickles a byte at a time is cut off too).

    The kernel keeps the time (SO_RCVTIMEO, SO_SNDTIMEO on a blocking socket): one
    system call per read or write, where Python's own timeouts make three (the mode,
    poll, the call), each of which gives the worker's event loop the GIL and takes it back.
    """

    def __init__(self, sock: socket.socket, server: smtp.Server, timeout: float) -> None:
        self.sock = sock
        self.server = server
        self.timeout = timeout
        seconds, fraction = divmod(timeout, 1.0)
        interval = struct.pack("@ll", int(seconds), int(fraction * 1_000_000))
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
        self._deadline = time.monotonic() + timeout

    def read(self) -> bytes:
        now = time.monotonic()
        if self.server.state == smtp.State.DATA:
            self._deadline = now + self.timeout
        try:
            if now >= self._deadline:
                raise BlockingIOError
            return self.sock.recv(_CHUNK)
        except BlockingIOError:  # SO_RCVTIMEO ran out (EAGAIN), or the command's time
            self._say_goodbye(f"421 4.4.2 {self.server.hostname} timeout, closing\r\n")
            raise Gone from None
        except OSError as e:
            raise Gone from e

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise Gone from e
        self._deadline = time.monotonic() + self.timeout

    def _say_goodbye(self, text: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(text.encode(), socket.MSG_DONTWAIT)


class Sessions:
    """The worker's end of its session channel, and the sessions it is serving."""

    def __init__(
        self,
        channel: socket.socket,
        profile: Profile,
        logins: Mapping[int, str],
        limits: Limits,
        spawn: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.channel = channel
        self.profile = profile
        self.logins = logins  # uid -> login name, as passwd said before the jail
        self.limits = limits
        self._spawn = spawn or _thread
        self._lock = threading.Lock()
        self._clients: Counter[str] = Counter()
        channel.setblocking(False)

    @property
    def active(self) -> int:
        with self._lock:
            return self._clients.total()

    def on_readable(self) -> None:
        """Take the sessions that have come (the event loop calls this)."""
        for _ in range(_PER_WAKE):
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, sessionhandoff.MAX_HANDOFF, 1)
            except BlockingIOError:
                return
            if not data and not fds:
                # The supervisor is gone (its death signal follows): stop listening, or
                # the readable end would wake the loop for ever.
                asyncio.get_running_loop().remove_reader(self.channel)
                return
            try:
                given = sessionhandoff.decode(data)
            except sessionhandoff.HandoffError as e:
                log.error("%s: refused a session handoff: %s", self.profile.domain, e)
                given = None
            socks = [socket.socket(fileno=fd) for fd in fds]
            if given is None or len(socks) != 1:
                for sock in socks:
                    sock.close()
                continue
            self._take(given, socks[0])

    def _take(self, given: sessionhandoff.Handoff, sock: socket.socket) -> None:
        client = _client_key(given)
        with self._lock:
            full = self._clients.total() >= self.limits.session_limit
            busy = self._clients[client] >= self.limits.client_limit
            if not (full or busy):
                self._clients[client] += 1
        if full or busy:
            what = "sessions" if full else "sessions from you"
            _refuse(sock, f"421 4.7.0 {self.profile.domain} too many {what}; try again later")
            log.warning(
                "%s: refused a session of %s: too many %s", self.profile.domain, given.client, what
            )
            return
        self._spawn(lambda: self._serve(given, sock, client))

    def _serve(self, given: sessionhandoff.Handoff, sock: socket.socket, client: str) -> None:
        try:
            login = self._login(given)
            policy = smtp.Policy(greet=given.user is None, bare_newlines=False)
            server = smtp.Server(
                self.profile.domain, size_limit=self.profile.message_size_limit, policy=policy
            )
            serve(
                server, SocketConnection(sock, server, self.limits.timeout), self.profile, login, ""
            )
        except Exception:
            log.exception("%s: session of %s failed", self.profile.domain, given.client)
        finally:
            sock.close()
            with self._lock:
                self._clients[client] -= 1
                self._clients += Counter()  # drop the clients at zero

    def _login(self, given: sessionhandoff.Handoff) -> str:
        if given.user is not None:
            return given.user.rpartition("@")[0]
        assert given.uid is not None
        return self.logins.get(given.uid, f"uid{given.uid}")


def _client_key(given: sessionhandoff.Handoff) -> str:
    return f"uid {given.uid}" if given.user is None else given.user


def _refuse(sock: socket.socket, text: str) -> None:
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(f"{text}\r\n".encode())
    sock.close()


def _thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="smtpd session", daemon=True).start()
