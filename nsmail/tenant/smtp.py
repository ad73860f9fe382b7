"""SMTP sessions over asyncio: connect from the tenant's address, keep each stage's
deadline, STARTTLS, stream messages. The protocol is `nsmail.core.smtp.Client`'s.

`open_session` connects, reads the greeting, says EHLO (or HELO) and does STARTTLS as
`TlsMode` asks, then returns a `Session` ready for transactions, or raises
`SessionError` with the `Failure`. `Session.deliver` runs one transaction and returns
each recipient's result; a session carries as many as the caller likes (RFC 5321 3.3),
`reset` proves a kept one alive, `quit` ends one politely within `Timeouts.quit`, and
`abort` at once. Every close is a reset (SO_LINGER 0): no socket of the tenant's lingers
in FIN_WAIT or TIME_WAIT after the worker is gone, which would keep its namespace alive.

Why asyncio rather than a selector loop: a worker runs up to `max_sessions` sessions at
once, most of them waiting for a reply. asyncio brings what a selector loop would have to
be given by hand: a deadline per await (`asyncio.timeout`), TLS on an open connection
(`loop.start_tls`, over a non-blocking socket), and write flow control. Each connection
has one `asyncio.Protocol` that feeds the core as bytes arrive, so a reply nobody asked
for is caught when it comes, even on an idle session.

DANE (RFC 7672): given `Dane` records, the handshake checks no CA at all; the chain the
server sent must match one of the records instead (nsmail.core.dane), or the session
fails as a failed handshake would. Without usable records, TLS is still required, but
authenticates nothing (RFC 7672 2.2: TLSA records published, none usable).

Deadlines are per stage (RFC 5321 4.5.3.2), never per read: a server trickling one byte a
second of an endless reply still fails at the stage's deadline.

Security: runs as the tenant inside its namespace and chroot. Replies are hostile and
parsed only by the core, with bounds. No name is resolved here (glibc has no resolver
configuration in the chroot): the destination is an address the caller looked up, the
source the tenant's own (or the kernel's choice, for the host's own mail).
"""

from __future__ import annotations

import _ssl
import asyncio
import os
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

from nsmail.core import dane
from nsmail.core.message import CHUNK, Message, dot_stuffed
from nsmail.core.smtp import (
    Client,
    Extensions,
    Failure,
    Results,
    Stage,
    State,
    TlsMode,
    refused,
    timed_out,
)

Address = IPv4Address | IPv6Address
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with RST, keep no state


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds each stage may take: RFC 5321 4.5.3.2 where it sets one."""

    connect: float = 30.0  # Postfix's smtp_connect_timeout; the RFC names none
    greeting: float = 300.0  # 4.5.3.2.1
    command: float = 300.0  # EHLO, HELO, STARTTLS, RSET: as MAIL (Postfix's smtp_helo_timeout)
    mail: float = 300.0  # 4.5.3.2.2
    rcpt: float = 300.0  # 4.5.3.2.3
    data: float = 120.0  # 4.5.3.2.4: the reply to DATA
    block: float = 180.0  # 4.5.3.2.5: each data block written, until it drains
    dot: float = 600.0  # 4.5.3.2.6: the reply after the final dot
    # The handshake alone, after the reply to STARTTLS: a round trip or two and a signature,
    # seconds on a loaded server. Longer means broken, and opportunistic TLS then retries
    # in the clear at once: five minutes (Postfix's smtp_starttls_timeout) would hold up
    # every message to such a host by as much.
    tls: float = 60.0
    # The reply to QUIT changes nothing for the mail, only holds a session slot.
    quit: float = 10.0

    def of(self, stage: Stage) -> float:
        seconds: float = getattr(self, _TIMEOUTS[stage])
        return seconds


_TIMEOUTS = {
    Stage.CONNECT: "connect",
    Stage.GREETING: "greeting",
    Stage.EHLO: "command",
    Stage.HELO: "command",
    Stage.STARTTLS: "command",
    Stage.RSET: "command",
    Stage.TLS: "tls",
    Stage.MAIL: "mail",
    Stage.RCPT: "rcpt",
    Stage.DATA: "data",
    Stage.MESSAGE: "block",
    Stage.DOT: "dot",
    Stage.QUIT: "quit",
}


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The client's TLS contexts, made before the chroot (they read the CA store)."""

    opportunistic: ssl.SSLContext  # TlsMode.MAY: no certificate check (RFC 7435)
    verifying: ssl.SSLContext  # TlsMode.VERIFY: the certificate must name the server

    def __post_init__(self) -> None:
        if self.verifying.verify_mode != ssl.CERT_REQUIRED or not self.verifying.check_hostname:
            raise ValueError("the verifying TLS context must check certificates and names")


@dataclass(frozen=True, slots=True)
class Dane:
    """A session authenticated by DANE: what the server's chain must match."""

    records: tuple[dane.Tlsa, ...]  # the usable ones; none: encrypted, not authenticated
    names: tuple[str, ...]  # what a DANE-TA chain must name: the MX host, the domain


class TlsState(StrEnum):
    """What a session's TLS turned out to be."""

    NONE = "none"  # in clear
    MAY = "may"  # encrypted, the certificate unchecked
    VERIFIED = "verified"  # encrypted, the certificate valid for the server's name
    DANE = "dane"  # encrypted, the certificate matches the server's TLSA records


class SessionError(Exception):
    """The session failed, or could not be opened: `failure` says how."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.words)
        self.failure = failure


async def open_session(
    address: Address,
    port: int,
    *,
    source: Address | None,
    ehlo: str,
    tls: TlsMode,
    contexts: TlsContexts,
    timeouts: Timeouts,
    server_name: str,
    dane: Dane | None = None,
) -> Session:
    """A session with `address`, greeted and as encrypted as `tls` asks.

    `source` is the tenant's address of the same family (None: the kernel picks, for the
    host's own mail); `server_name` the MX host's name, for SNI and certificate checks.
    With `dane` (and `tls` VERIFY), the certificate is checked against its records, not
    the CA store. Raises `SessionError`; a failure of kind TLS at stage TLS means the
    handshake failed and, for `TlsMode.MAY`, a new session without TLS may succeed at once.
    """
    if dane is not None and tls is not TlsMode.VERIFY:
        raise ValueError("DANE requires TLS")
    sock = await connect(address, port, source, timeouts.connect)
    client = Client(ehlo, tls)
    wire = _Wire(client)
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: wire, sock=sock)
    except BaseException:
        sock.close()
        raise
    session = Session(client, wire, transport, sock, server_name, contexts, timeouts, dane)
    try:
        await session._open()
    except BaseException:
        session.abort()
        raise
    if client.failure is not None:
        raise SessionError(client.failure)
    return session


class Session:
    """One open SMTP session; its methods must not run concurrently.

    `reset` and `quit` want a usable session; `deliver` also takes one the server closed
    while idle (each recipient then gets the reason), but not one the caller closed.
    """

    def __init__(
        self,
        client: Client,
        wire: _Wire,
        transport: asyncio.Transport,
        sock: socket.socket,
        server_name: str,
        contexts: TlsContexts,
        timeouts: Timeouts,
        dane: Dane | None = None,
    ) -> None:
        self._client = client
        self._dane = dane
        self._wire = wire
        self._transport = transport
        self._server_name = server_name
        self._contexts = contexts
        self._timeouts = timeouts
        peer = sock.getpeername()
        self.peer: tuple[Address, int] = (ip_address(peer[0]), peer[1])
        self.source: Address = ip_address(sock.getsockname()[0])

    @property
    def tls(self) -> TlsState:
        if not self._client.encrypted:
            return TlsState.NONE
        if self._dane is not None:
            return TlsState.DANE if self._dane.records else TlsState.MAY
        return TlsState.VERIFIED if self._client.mode is TlsMode.VERIFY else TlsState.MAY

    @property
    def extensions(self) -> Extensions:
        return self._client.extensions

    @property
    def transactions(self) -> int:
        """Transactions begun on this session (a kept session has more than one)."""
        return self._client.transactions

    @property
    def usable(self) -> bool:
        """Whether the session is open and idle; false once the server closed it."""
        return self._client.state is State.READY

    @property
    def failure(self) -> Failure | None:
        """Why the session closed, if it failed."""
        return self._client.failure

    async def deliver(self, sender: str, recipients: Sequence[str], message: Message) -> Results:
        """One transaction: each recipient's `Delivered` or `Failure`, in the given order.

        Never raises for anything the server does. An OSError reading `message` (its
        queue file) propagates; if it came while the message was being sent, the session
        is aborted first, so that no torn message can be taken.
        """
        client = self._client
        client.begin(sender, recipients, message.size, not message.is_ascii())
        try:
            await self._exchange()
            if client.state is State.MESSAGE:
                await self._send_message(message)
                await self._exchange()
        except BaseException:
            self.abort()
            raise
        return client.results()

    async def reset(self) -> None:
        """RSET: proves a kept session alive before it is used; raises `SessionError`."""
        self._client.reset()
        try:
            await self._exchange()
        except BaseException:
            self.abort()
            raise
        if self._client.failure is not None:
            raise SessionError(self._client.failure)

    async def quit(self) -> None:
        """QUIT, its reply awaited at most `Timeouts.quit`, then close. Never raises."""
        try:
            if self.usable:
                self._client.quit()
                await self._exchange()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close now, with a reset."""
        if not self._client.closed:
            self._client.close()
        self._transport.abort()

    async def _open(self) -> None:
        while True:
            await self._exchange()
            if self._client.state is not State.HANDSHAKE:
                return
            await self._handshake()

    async def _exchange(self) -> None:
        """Write what the core has to say, then read replies, each within its stage's
        deadline, until the core awaits none."""
        client = self._client
        while True:
            data = client.data_to_send()
            if data:
                self._transport.write(data)
            stage = client.awaiting
            if stage is None:
                break
            seen = client.replies
            seconds = self._timeouts.of(stage)
            try:
                async with asyncio.timeout(seconds):
                    while client.replies == seen and not client.closed:
                        await self._wire.changed()
            except TimeoutError:
                client.timed_out(stage, seconds)
        if client.closed:
            self.abort()

    async def _handshake(self) -> None:
        client = self._client
        verifying = client.mode is TlsMode.VERIFY and self._dane is None
        context = self._contexts.verifying if verifying else self._contexts.opportunistic
        seconds = self._timeouts.tls
        self._wire.handshaking = True  # a failed handshake closes the connection: not a drop
        try:
            async with asyncio.timeout(seconds):
                transport = await asyncio.get_running_loop().start_tls(
                    self._transport,
                    self._wire,
                    context,
                    server_hostname=self._server_name,
                    ssl_handshake_timeout=seconds,
                )
        except TimeoutError:
            client.tls_failed(f"timed out after {seconds:g} s")
        except OSError as e:  # ssl.SSLError is one
            client.tls_failed(_tls_words(e))
        else:
            if transport is None:
                client.tls_failed("connection closed by the server")
                return
            self._transport = transport
            mismatch = self._dane_mismatch(transport)
            if mismatch is None:
                client.tls_started()
            else:
                client.tls_failed(f"DANE: {mismatch}")
        finally:
            self._wire.handshaking = False

    def _dane_mismatch(self, transport: asyncio.Transport) -> str | None:
        """Why the server's chain fails its TLSA records; None when it matches, or when
        DANE does not apply (RFC 7672 3.1: names and dates only as the usage says)."""
        if self._dane is None or not self._dane.records:
            return None
        chain = _chain(transport.get_extra_info("ssl_object"))
        return dane.check(self._dane.records, chain, self._dane.names, datetime.now(UTC))

    async def _send_message(self, message: Message) -> None:
        """The message after a 354, streamed from the queue file in CHUNK-sized writes."""
        client = self._client
        # Whole pieces in as few writes as possible, the final dot with the last one: a
        # small write after another waits for its ACK (Nagle), which the server may delay.
        pending: list[bytes] = []
        size = 0
        for piece in dot_stuffed(message.wire()):
            pending.append(piece)
            size += len(piece)
            if size >= CHUNK:
                await self._write_block(b"".join(pending))
                pending, size = [], 0
                if client.closed:
                    return
        client.end_of_message()
        await self._write_block(b"".join([*pending, client.data_to_send()]))

    async def _write_block(self, data: bytes) -> None:
        """Write `data`; it must drain within the data block deadline (RFC 5321 4.5.3.2.5)."""
        if self._client.closed:
            return
        self._transport.write(data)
        seconds = self._timeouts.block
        try:
            async with asyncio.timeout(seconds):
                await self._wire.drained()
        except TimeoutError:
            self._client.timed_out(Stage.MESSAGE, seconds)


class _Wire(asyncio.Protocol):
    """Feeds the core as bytes arrive, wakes the session's task, and tells it when the
    transport's write buffer has drained."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._changed: asyncio.Future[None] | None = None
        self._resumed: asyncio.Future[None] | None = None
        self._paused = False
        self.handshaking = False

    def data_received(self, data: bytes) -> None:
        self._client.receive(data)
        self._wake()

    def eof_received(self) -> None:
        self._client.receive_eof()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshaking:
            self._client.receive_eof(_lost_words(exc))
        self._paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    async def changed(self) -> None:
        """Until the next bytes, end of file or resumption."""
        self._changed = asyncio.get_running_loop().create_future()
        try:
            await self._changed
        finally:
            self._changed = None

    async def drained(self) -> None:
        while self._paused and not self._client.closed:
            await self.changed()

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)


def _chain(tls: ssl.SSLObject | None) -> list[bytes]:
    """The certificates the server sent, DER, its own first. Python 3.11 has the chain
    only under a private name (public from 3.13): without it, the server's own alone."""
    if tls is None:
        return []
    sent = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", lambda: None)()
    if sent:
        return [certificate.public_bytes(_ssl.ENCODING_DER) for certificate in sent]
    own = tls.getpeercert(binary_form=True)
    return [own] if own else []


async def connect(
    address: Address, port: int, source: Address | None, seconds: float
) -> socket.socket:
    """A connected non-blocking socket from `source` to `address`; raises `SessionError`."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        if source is not None:
            sock.bind((str(source), 0))
        async with asyncio.timeout(seconds):
            await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
    except TimeoutError:
        sock.close()
        raise SessionError(timed_out(Stage.CONNECT, seconds)) from None
    except OSError as e:
        sock.close()
        raise SessionError(refused(_os_words(e))) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _os_words(error: OSError) -> str:
    """ "connection refused", "network is unreachable": the C library's words, no names."""
    return os.strerror(error.errno).lower() if error.errno else str(error) or "failed"


def _lost_words(error: Exception | None) -> str:
    if error is None:
        return "connection closed by the server"
    if isinstance(error, ConnectionResetError):
        return "connection reset by the server"
    return _os_words(error) if isinstance(error, OSError) else str(error)


def _tls_words(error: OSError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")  # "WRONG_VERSION_NUMBER"
    return _lost_words(error)
