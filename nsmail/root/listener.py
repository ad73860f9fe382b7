"""nsmail's SMTP listeners on the host: accept, ask the kernel whose, hand to the tenant.

Local submission needs no password: the listeners on loopback (`[smtpd] local`, by
default 127.0.0.1:25 and [::1]:25, as Debian's Postfix listens) and the Unix socket
`run_dir/smtp` (mode 0666: for every local user, and for containers it is mounted
into) take a connection, and the kernel names the uid at the other end
(`nsmail.root.peers`: SO_PEERCRED, sock_diag). That uid is the submitter, exactly as
`nsmail-sendmail` takes its caller's uid: a tenant's uid submits as the tenant, any
other local user as the hosting machine. The connection goes, unread, to that tenant's
worker over its session channel (`SessionChannel`, SCM_RIGHTS), which serves the session
as the tenant (`nsmail.tenant.smtpd`); an asleep tenant is woken for it. A connection
nobody can take now (the tenant's worker backing off or stopping, its channel full, a
peer the kernel cannot name) gets one fixed reply, 421 4.3.2, and is closed.

The submission front (`nsmail.host.submission`) serves 587 and 465; what it authenticated
reaches the supervisor as a `Handoff` on its channel and goes the same way.

Security: runs as root in the supervisor's loop. It never reads from a client: accept,
getsockopt, one netlink round trip, sendmsg and close, all without waiting on the
client, a bounded number per wake-up. A channel holds a bounded queue (its socket
buffer), so a flood of connections for one tenant fills that tenant's channel only; the
worker limits sessions per client and in all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
from collections.abc import Callable
from pathlib import Path

from nsmail.core import handoff
from nsmail.core.config import Endpoint, SmtpdConfig
from nsmail.core.handoff import Handoff
from nsmail.root import peers

log = logging.getLogger("nsmail.root.listener")

SOCKET_NAME = "smtp"  # in run_dir
_ACCEPTS_PER_WAKE = 32
_BACKLOG = 128

# Where a connection goes once its client is known: the supervisor routes it.
Route = Callable[[socket.socket, Handoff], None]


def refuse(conn: socket.socket, text: str) -> None:
    """Say `text` (one reply line) if the socket takes it at once, and close."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(f"{text}\r\n".encode())
    conn.close()


class SessionChannel:
    """How connections reach one worker: a SEQPACKET pair, one datagram per session.

    The supervisor keeps both ends: the worker's end goes to the worker at its start,
    and once that worker is gone, whatever it did not take is read back from it
    (`leftovers`) and routed again, so a session sent as the worker retired is not lost.
    """

    def __init__(self) -> None:
        self.mine, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.mine.setblocking(False)
        self.theirs.setblocking(False)

    def send(self, conn: socket.socket, given: Handoff) -> bool:
        """Queue `conn` for the worker; False if the channel is full or closed."""
        try:
            socket.send_fds(self.mine, [handoff.encode(given)], [conn.fileno()])
        except OSError:
            return False
        return True

    def leftovers(self) -> list[tuple[socket.socket, Handoff]]:
        """The sessions the worker did not take (call once it is gone)."""
        found: list[tuple[socket.socket, Handoff]] = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.theirs, handoff.MAX_HANDOFF, 1)
            except OSError:
                return found
            if not fds:
                return found
            conn = socket.socket(fileno=fds[0])
            found.append((conn, handoff.decode(data)))  # our own encoding

    def close(self) -> None:
        self.mine.close()
        self.theirs.close()


class LocalListeners:
    """The loopback TCP listeners and the Unix socket, served from `selector`."""

    def __init__(
        self, config: SmtpdConfig, run_dir: Path, selector: selectors.BaseSelector, route: Route
    ) -> None:
        self.selector = selector
        self.route = route
        self.diag = peers.Diag()
        self.listeners: list[socket.socket] = []
        for endpoint in config.local:
            self._listen(_tcp(endpoint), f"[{endpoint[0]}]:{endpoint[1]}")
        self.socket_path = run_dir / SOCKET_NAME if config.socket else None
        if self.socket_path is not None:
            self._listen(_unix(self.socket_path), str(self.socket_path))

    def close(self) -> None:
        for listener in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(listener)
            listener.close()
        self.listeners = []
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        self.diag.close()

    def _listen(self, make: Callable[[], socket.socket], where: str) -> None:
        try:
            listener = make()
        except OSError as e:
            # Another MTA on the port, say: the rest of nsmail runs on without it.
            log.error("SMTP listener %s: cannot listen: %s", where, e.strerror or e)
            return
        listener.setblocking(False)
        self.listeners.append(listener)
        self.selector.register(listener, selectors.EVENT_READ, lambda: self._accept(listener))
        log.info("SMTP listener %s: local submission, the kernel names the client", where)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                conn, address = listener.accept()
            except OSError:  # none pending (BlockingIOError), or it left already
                return
            try:
                given = self._identify(conn, address)
            except OSError as e:
                refuse(conn, "421 4.7.0 who you are cannot be told; closing")
                log.warning("SMTP listener: refused a client the kernel does not name: %s", e)
                continue
            self.route(conn, given)

    def _identify(self, conn: socket.socket, address: object) -> Handoff:
        if conn.family == socket.AF_UNIX:
            uid = peers.unix_peer_uid(conn)
            return Handoff(f"uid {uid} on {self.socket_path}", uid=uid)
        uid = self.diag.tcp_peer_uid(conn)
        host, port = conn.getpeername()[:2]
        return Handoff(f"uid {uid} from [{host}]:{port}", uid=uid)


def _tcp(endpoint: Endpoint) -> Callable[[], socket.socket]:
    def make() -> socket.socket:
        address, port = endpoint
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind((str(address), port))
            listener.listen(_BACKLOG)
        except OSError:
            listener.close()
            raise
        return listener

    return make


def _unix(path: Path) -> Callable[[], socket.socket]:
    def make() -> socket.socket:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o666)  # every local user may connect: the kernel names them
            listener.listen(_BACKLOG)
        except OSError:
            listener.close()
            raise
        return listener

    return make
