"""The submission front: ports 587 and 465, TLS and AUTH, then the session to the tenant.

Remote clients (tenants' mail clients, apps elsewhere) submit on 587 with STARTTLS
(RFC 6409; nothing but EHLO, STARTTLS, NOOP, RSET and QUIT before it) and on 465 with TLS
from the first byte (RFC 8314), and authenticate with AUTH PLAIN or LOGIN, offered only
under TLS, as `user@domain` with the password `nsmail tenant passwd` set. The front
speaks that much SMTP (`nsmail.core.smtp.server` with `Policy(auth=True)`: MAIL before
AUTH is 530) and no more: once a client has authenticated, it makes a socketpair, hands
one end to the supervisor with the user's name (`nsmail.core.sessionhandoff`), which passes it
to the worker of the user's tenant, and relays bytes between the client's TLS session
and its end. The worker serves the rest of the session as the tenant, as it serves a
local one (`nsmail.tenant.smtpd`), and its deadlines and limits apply through the relay.

Passwords are checked against yescrypt hashes in a thread (`nsmail.host.passwords`), so
the 20 ms of a check never hold the event loop. Failed logins are counted per client
address (IPv6 per /64) and, past `throttle.LIMIT` within `throttle.WINDOW`, AUTH from
there gets 454 until the window has passed (`nsmail.core.throttle`, bounded memory).
At most `client_limit` connections per address and `session_limit` in all: over them a
client gets 421 4.7.0 at once. A client must complete each command within `timeout` of
the reply before it, and the TLS handshake within `timeout`; then 421 4.4.2.

Why this is not aiosmtpd (a dependency already, for the lab's receiver): the session
must be served by the tenant's own process after AUTH, which no SMTP framework's
handler model gives (its session lives in the one process that accepted it), and the
protocol is the sans-IO core that `sendmail -bs` and the worker already use, so every
listener parses SMTP with the same code and the same limits. asyncio's streams do TLS,
STARTTLS included.

Security: runs as `[smtpd] user` (nsmail-submit, no other process's), without
capabilities, chrooted into an empty directory, in the host namespace. Root gave it,
before the jail, the listening sockets, the certificate and key (loaded into the TLS
context, then out of reach), libcrypt, and over its channel an open descriptor of the
credentials file and the tenants' domains. Every byte it reads is a remote client's. It
decides who a client is (as Postfix's smtpd does with SASL): taken over, it could claim
any tenant's user, so it holds nothing else, and the supervisor passes on only a
well-formed handoff for a configured tenant.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from nsmail.core import credentials, sessionhandoff
from nsmail.core.smtp import server as smtp
from nsmail.core.throttle import LoginThrottle, client_key
from nsmail.host.passwords import Crypt

log = logging.getLogger("nsmail.host.submission")

_CHUNK = 1 << 16
MAX_CONTROL = 65536  # a credentials message: the tenants' domains


@dataclass(frozen=True, slots=True)
class Settings:
    hostname: str
    certificate: Path
    key: Path
    implicit_tls: tuple[bool, ...]  # per listening socket given: 465 (True) or 587
    size_limit: int  # announced in EHLO; the tenant's own limit applies after AUTH
    timeout: float
    client_limit: int
    session_limit: int


def credentials_message(domains: frozenset[str]) -> bytes:
    """What the supervisor sends with the credentials file's descriptor."""
    return json.dumps({"domains": sorted(domains)}).encode()


def main(settings: Settings, fds: list[int]) -> Callable[[], None]:
    """The zygote's target: load what needs files (root, before the jail), then run."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996
    tls.load_cert_chain(settings.certificate, settings.key)
    crypt = Crypt()
    channel, *listeners = (socket.socket(fileno=fd) for fd in fds)
    front = Front(settings, tls, crypt, channel, listeners)
    return partial(asyncio.run, front.run())


class Front:
    def __init__(
        self,
        settings: Settings,
        tls: ssl.SSLContext,
        crypt: Crypt,
        channel: socket.socket,
        listeners: list[socket.socket],
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.crypt = crypt
        self.channel = channel
        self.listeners = listeners
        self.users: dict[str, str] = {}
        self.throttle = LoginThrottle()
        self.clients: Counter[str] = Counter()
        self._checks = concurrent.futures.ThreadPoolExecutor(2, "password check")
        self._gone = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        loop.add_reader(self.channel, self._on_channel)
        servers = []
        for listener, implicit in zip(self.listeners, self.settings.implicit_tls, strict=True):
            servers.append(
                await asyncio.start_server(
                    partial(self._client, implicit=implicit),
                    sock=listener,
                    ssl=self.tls if implicit else None,
                    ssl_handshake_timeout=self.settings.timeout if implicit else None,
                )
            )
        await self._gone.wait()  # the supervisor closed the channel
        for server in servers:
            server.close()
        self._checks.shutdown(wait=False, cancel_futures=True)

    # -- the supervisor's channel -------------------------------------------------------

    def _on_channel(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, MAX_CONTROL, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._gone.set()
            asyncio.get_running_loop().remove_reader(self.channel)
            return
        try:
            domains = frozenset(json.loads(data)["domains"])
            text = _read_all(fds[0]) if fds else ""
            self.users = credentials.of_domains(credentials.parse(text), domains)
            log.info("submission: %d users of %d tenants may log in", len(self.users), len(domains))
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.error("submission: the credentials are not usable, keeping the last: %s", e)
        finally:
            for fd in fds:
                os.close(fd)

    # -- a client -----------------------------------------------------------------------

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, implicit: bool
    ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        address = str(peer[0])
        where = f"[{address}]:{peer[1]}"
        key = client_key(address)
        settings = self.settings
        if self.clients.total() >= settings.session_limit:
            await _goodbye(writer, f"421 4.7.0 {settings.hostname} too many sessions; try later")
            return
        if self.clients[key] >= settings.client_limit:
            await _goodbye(writer, f"421 4.7.0 {settings.hostname} too many sessions from you")
            return
        self.clients[key] += 1
        try:
            policy = smtp.Policy(
                starttls=not implicit, tls=implicit, auth=True, bare_newlines=False
            )
            server = smtp.Server(settings.hostname, size_limit=settings.size_limit, policy=policy)
            worker = await self._converse(server, reader, writer, where, key)
            if worker is not None:
                await self._relay(reader, writer, worker, server.unread())
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client's trouble ends its connection only
        except Exception:
            log.exception("submission: the session of %s failed", where)
        finally:
            self.clients[key] -= 1
            self.clients += Counter()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(
        self,
        server: smtp.Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        where: str,
        key: str,
    ) -> socket.socket | None:
        """Speak SMTP until AUTH succeeds (the worker's end, to relay to) or the end."""
        timeout = self.settings.timeout
        deadline = time.monotonic() + timeout
        while True:
            event = server.next_event()
            if isinstance(event, smtp.Output):
                writer.write(event.data)
                deadline = time.monotonic() + timeout
            elif event is smtp.NEED_DATA:
                await asyncio.wait_for(writer.drain(), timeout)
                try:
                    data = await asyncio.wait_for(reader.read(_CHUNK), deadline - time.monotonic())
                except TimeoutError:
                    await _goodbye(writer, f"421 4.4.2 {server.hostname} timeout, closing")
                    return None
                server.receive(data)
            elif isinstance(event, smtp.StartTls):
                # Read nothing more in clear: the client's TLS hello must reach the TLS
                # layer, not the plain reader, and anything it sent after STARTTLS before
                # our reply is dropped (RFC 3207 4.2; the injection of CVE-2011-0411).
                transport = writer.transport
                assert isinstance(transport, asyncio.Transport)  # a socket's: it reads too
                transport.pause_reading()
                _discard_buffered(reader)
                server.answer()
                await self._flush(server, writer)
                await writer.start_tls(self.tls, ssl_handshake_timeout=timeout)
                server.tls_started()
            elif isinstance(event, smtp.Authenticate):
                worker = await self._authenticate(server, event, where, key)
                await self._flush(server, writer)
                if worker is not None:
                    return worker
            elif isinstance(event, smtp.Closed):
                await asyncio.wait_for(writer.drain(), timeout)
                return None
            else:  # MAIL and the rest come only after AUTH, which ends this part
                raise AssertionError(f"unexpected {event}")

    async def _flush(self, server: smtp.Server, writer: asyncio.StreamWriter) -> None:
        """Send the replies the server has (up to where it would want input)."""
        while isinstance(event := server.next_event(), smtp.Output):
            writer.write(event.data)
        assert event is smtp.NEED_DATA, event
        await asyncio.wait_for(writer.drain(), self.settings.timeout)

    async def _authenticate(
        self, server: smtp.Server, event: smtp.Authenticate, where: str, key: str
    ) -> socket.socket | None:
        """Check the credentials and answer; on success, the worker's end of the session."""
        if self.throttle.blocked(key, time.monotonic()):
            server.answer(smtp.Reply(454, "4.7.0 too many failed logins; try again later"))
            return None
        creds = event.credentials
        user = creds.user.lower()
        loop = asyncio.get_running_loop()
        hashed = self.users.get(user)
        valid = await loop.run_in_executor(self._checks, self.crypt.verify, creds.password, hashed)
        if not (valid and creds.acts_as_itself):
            self.throttle.failed(key, time.monotonic())
            log.warning("submission: authentication failed for %r from %s", user[:80], where)
            server.answer(smtp.Reply(535, "5.7.8 authentication credentials invalid"))
            return None
        self.throttle.succeeded(key)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            try:
                given = sessionhandoff.encode(sessionhandoff.Handoff(where, user=user))
                socket.send_fds(self.channel, [given], [theirs.fileno()], socket.MSG_DONTWAIT)
            except OSError:
                mine.close()
                server.answer(smtp.Reply(454, "4.3.0 cannot take mail now; try again later"))
                return None
        log.info("submission: %s authenticated from %s", user, where)
        server.answer()
        return mine

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        worker: socket.socket,
        pipelined: bytes,
    ) -> None:
        """Relay between the client and the worker until either side ends."""
        worker_reader, worker_writer = await asyncio.open_unix_connection(sock=worker)
        worker_writer.write(pipelined)
        timeout = self.settings.timeout
        pumps = [
            asyncio.create_task(_pump(reader, worker_writer, timeout)),
            asyncio.create_task(_pump(worker_reader, writer, timeout)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            worker_writer.close()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, timeout: float) -> None:
    """Copy until the end of `src`. Reads wait as long as they need (the worker's own
    deadlines end a slow client's session, and with it this relay); a side that does
    not take what is written within `timeout` ends it."""
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        while data := await src.read(_CHUNK):
            dst.write(data)
            await asyncio.wait_for(dst.drain(), timeout)


async def _goodbye(writer: asyncio.StreamWriter, text: str) -> None:
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        writer.write(f"{text}\r\n".encode())
        await asyncio.wait_for(writer.drain(), 1.0)


def _discard_buffered(reader: asyncio.StreamReader) -> None:
    """Drop what `reader` holds unread. StreamReader has no public way to: its buffer (a
    bytearray in every CPython since 3.4) is cleared, and a reader without one ends the
    session (KeyError) rather than let plain text pass for encrypted."""
    buffered: bytearray = vars(reader)["_buffer"]
    buffered.clear()


def _read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, _CHUNK):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8")
