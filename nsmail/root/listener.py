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
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from nsmail.core import credentials, sessionhandoff
from nsmail.core.config import Config, Endpoint, SmtpdConfig
from nsmail.core.retry import RestartPolicy, quick_deaths, restart_delay
from nsmail.core.sessionhandoff import Handoff
from nsmail.host import submission
from nsmail.host.submission import Settings, credentials_message
from nsmail.root import peers
from nsmail.root.jail import Identity
from nsmail.root.spawn import SpawnError, Zygote

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
            socket.send_fds(self.mine, [sessionhandoff.encode(given)], [conn.fileno()])
        except OSError:
            return False
        return True

    def leftovers(self) -> list[tuple[socket.socket, Handoff]]:
        """The sessions the worker did not take (call once it is gone)."""
        found: list[tuple[socket.socket, Handoff]] = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.theirs, sessionhandoff.MAX_HANDOFF, 1)
            except OSError:
                return found
            if not fds:
                return found
            conn = socket.socket(fileno=fds[0])
            found.append((conn, sessionhandoff.decode(data)))  # our own encoding

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
    address, port = endpoint
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET

    def bind(listener: socket.socket) -> None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((str(address), port))

    return partial(_listening, family, bind)


def _unix(path: Path) -> Callable[[], socket.socket]:
    def bind(listener: socket.socket) -> None:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        listener.bind(str(path))
        os.chmod(path, 0o666)  # every local user may connect: the kernel names them

    return partial(_listening, socket.AF_UNIX, bind)


def _listening(family: int, bind: Callable[[socket.socket], None]) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        bind(listener)
        listener.listen(_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


class SubmissionFront:
    """The submission front process (`nsmail.host.submission`) for ports 587 and 465: its
    listening sockets (bound here, as root, and kept across its restarts, so clients
    wait in the backlog meanwhile), its channel, and its restarts after back-off.

    Whatever the front sends on its channel is a `Handoff` for a user it authenticated,
    with the worker's end of the session: it is decoded strictly and routed like a local
    connection, to the tenant of the user's domain only.
    """

    def __init__(
        self,
        config: Config,
        zygote: Zygote,
        selector: selectors.BaseSelector,
        route: Route,
        restarts: RestartPolicy,
    ) -> None:
        self.config = config
        self.zygote = zygote
        self.selector = selector
        self.route = route
        self.restarts = restarts
        self.pid: int | None = None
        self.due = float("inf")  # monotonic: the next start
        self._channel: socket.socket | None = None
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._starting = False
        self._started = 0.0
        self._crashes = 0
        self._stopping = False

    def start(self) -> None:
        """Bind 587 and 465 if configured (with a certificate), and start the front."""
        smtpd = self.config.smtpd
        if not smtpd.remote or self._stopping:
            return
        if not self._listeners:
            for endpoints, implicit in ((smtpd.submission, False), (smtpd.submissions, True)):
                for endpoint in endpoints:
                    try:
                        self._listeners.append((_tcp(endpoint)(), implicit))
                    except OSError as e:
                        log.error("submission [%s]:%d: cannot listen: %s", *endpoint, e.strerror)
        if not self._listeners:
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            settings = Settings(
                hostname=self.config.host.name,
                certificate=smtpd.certificate or Path(),
                key=smtpd.key or Path(),
                implicit_tls=tuple(implicit for _, implicit in self._listeners),
                size_limit=self.config.delivery.message_size_limit,
                timeout=smtpd.timeout,
                client_limit=smtpd.client_limit,
                session_limit=smtpd.session_limit,
            )
            self._starting = True
            self.due = float("inf")
            self.zygote.request(
                "nsmail submission",
                Identity(uid=smtpd.uid, gid=smtpd.gid, root=self.config.host.run_dir / "empty"),
                None,
                [theirs.fileno(), *(listener.fileno() for listener, _ in self._listeners)],
                partial(submission.main, settings),
                self._spawned,
            )
        mine.setblocking(False)
        self._channel = mine
        self.selector.register(mine, selectors.EVENT_READ, self._on_channel)
        self.send_credentials()

    def send_credentials(self) -> None:
        """Give the front the credentials file as it is now, and the tenants' domains."""
        if self._channel is None:
            return
        domains = frozenset(t.domain for t in self.config.tenants)
        path = self.config.path.parent / credentials.FILE_NAME
        fds = []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds.append(fd)
        except FileNotFoundError:
            pass  # no users yet
        except OSError as e:
            log.error("submission: cannot open %s: %s", path, e.strerror)
            return
        try:
            socket.send_fds(self._channel, [credentials_message(domains)], fds)
        except OSError as e:
            log.error("submission: cannot give the front its credentials: %s", e)
        finally:
            for fd in fds:
                os.close(fd)

    def reconfigure(self, config: Config) -> None:
        """A reload: new settings restart the front; otherwise it gets the credentials."""
        changed = (config.smtpd, config.host.name) != (self.config.smtpd, self.config.host.name)
        self.config = config
        if not changed:
            self.send_credentials()
            return
        self._close_listeners()
        if self.pid is not None:
            os.kill(self.pid, signal.SIGTERM)  # reaping starts the new one
        elif not self._starting:
            self.start()

    def owns(self, pid: int) -> bool:
        return pid == self.pid

    def exited(self, how: str) -> None:
        """The front ended: start it again after back-off (or now, for new settings)."""
        ran = time.monotonic() - self._started
        self.pid = None
        self._close_channel()
        if self._stopping:
            return
        if self._listeners:
            self._crashes = quick_deaths(self.restarts, self._crashes, ran)
            delay = restart_delay(self.restarts, self._crashes)
            log.error("submission front %s; next start in %.0f s", how, delay)
            self.due = time.monotonic() + delay
        else:
            self.start()  # ended for new settings

    def tend(self, now: float) -> None:
        if self.due <= now and self.pid is None and not self._starting:
            self.start()

    def stop(self) -> None:
        self._stopping = True
        self._close_channel()  # the front's cue to end
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def close(self) -> None:
        self.stop()
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._close_listeners()

    def _spawned(self, result: int | SpawnError) -> None:
        self._starting = False
        if isinstance(result, SpawnError):
            self.pid = None
            self._close_channel()
            self._crashes = quick_deaths(self.restarts, self._crashes, 0.0)
            self.due = time.monotonic() + restart_delay(self.restarts, self._crashes)
            log.error("submission front could not start: %s", result)
            return
        self.pid = result
        self._started = time.monotonic()
        if not self._listeners:  # reconfigured while it was forked: it has the old settings
            os.kill(result, signal.SIGTERM)  # reaping starts the new one
            return
        log.info("submission front %d started on %d sockets", result, len(self._listeners))

    def _on_channel(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            if self._channel is None:
                return
            try:
                data, fds, _, _ = socket.recv_fds(self._channel, sessionhandoff.MAX_HANDOFF, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data and not fds:
                self._close_channel()  # the front is gone; reaping tells the rest
                return
            conns = [socket.socket(fileno=fd) for fd in fds]
            try:
                given = sessionhandoff.decode(data)
                if given.user is None or len(conns) != 1:
                    raise sessionhandoff.HandoffError(
                        "not an authenticated session with its socket"
                    )
            except sessionhandoff.HandoffError as e:
                log.warning("submission front: refused a handoff: %s", e)
                for conn in conns:
                    conn.close()
                continue
            self.route(conns[0], given)

    def _close_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self._channel)
            self._channel.close()
            self._channel = None

    def _close_listeners(self) -> None:
        for listener, _ in self._listeners:
            listener.close()
        self._listeners = []
