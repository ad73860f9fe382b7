"""The asyncio SMTP shell on loopback against real servers: aiosmtpd (with STARTTLS and a
throwaway CA), Postfix's smtp-sink, and scripted rude servers. Deadlines are proven by
what fails and where, with small timeouts, never by measuring time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import functools
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from smtp_servers import Recorder, free_port
from smtp_servers import smtp_server as aiosmtpd

from nsmail.core.message import CHUNK, Message
from nsmail.core.smtp import Delivered, Failure, Kind, Results, Stage, TlsMode
from nsmail.tenant.smtp import (
    Session,
    SessionError,
    Timeouts,
    TlsContexts,
    TlsState,
    open_session,
)

LOCAL = IPv4Address("127.0.0.1")
SOURCE = IPv4Address("127.0.0.2")  # loopback holds all of 127/8: the bind is visible
MX = "mx.rcpt.test"
BODY = Message.of(b"Subject: test\n\nhello\n.leading dot\n")
FAST = Timeouts(connect=2, greeting=2, command=2, mail=2, rcpt=2, data=2, block=2, dot=2, tls=2)

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


def opportunistic() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.cache
def default_contexts() -> TlsContexts:
    """Made once: loading the system's CA store takes tens of milliseconds."""
    return TlsContexts(opportunistic(), ssl.create_default_context())


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and a certificate it signed for MX."""

    server: ssl.SSLContext
    ca: Path

    def contexts(self) -> TlsContexts:
        return TlsContexts(opportunistic(), ssl.create_default_context(cafile=str(self.ca)))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nsmail test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(MX)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "leaf.pem", directory / "key.pem")
    return Pki(server, directory / "ca.pem")


# --- aiosmtpd, a real receiver (smtp_servers') ---------------------------------------


async def connect(
    port: int,
    *,
    tls: TlsMode = TlsMode.NONE,
    contexts: TlsContexts | None = None,
    timeouts: Timeouts = FAST,
    address: IPv4Address | IPv6Address = LOCAL,
    source: IPv4Address | IPv6Address | None = SOURCE,
    server_name: str = MX,
) -> Session:
    return await open_session(
        address,
        port,
        source=source,
        ehlo="mail.tenant.test",
        tls=tls,
        contexts=contexts or default_contexts(),
        timeouts=timeouts,
        server_name=server_name,
    )


async def failed_open(port: int, **kwargs: Any) -> Failure:
    with pytest.raises(SessionError) as raised:
        await connect(port, **kwargs)
    return raised.value.failure


def failure(result: Delivered | Failure) -> Failure:
    assert isinstance(result, Failure), result
    return result


def delivered(results: Results) -> bool:
    return all(isinstance(result, Delivered) for result in results.values())


def test_delivers_from_the_source_address_with_the_ehlo_name() -> None:
    recorder = Recorder()

    async def run(port: int) -> None:
        session = await connect(port)
        assert session.peer == (LOCAL, port) and session.source == SOURCE
        assert session.tls is TlsState.NONE and session.usable
        results = await session.deliver("alice@tenant.test", ["a@rcpt.test", "b@RCPT.test"], BODY)
        assert delivered(results) and list(results) == ["a@rcpt.test", "b@RCPT.test"]
        await session.quit()
        assert not session.usable

    with aiosmtpd(recorder) as port:
        asyncio.run(run(port))
    [message] = recorder.received
    assert (message.sender, message.recipients) == (
        "alice@tenant.test",
        ["a@rcpt.test", "b@RCPT.test"],
    )
    assert (message.peer, message.ehlo, message.tls) == ("127.0.0.2", "mail.tenant.test", False)
    assert message.content == b"Subject: test\r\n\r\nhello\r\n.leading dot\r\n"  # dot-stuffed


def test_one_session_carries_several_transactions() -> None:
    recorder = Recorder(rcpt_replies={"nobody": "550 5.1.1 no such user"})

    async def run(port: int) -> None:
        session = await connect(port)
        first = await session.deliver("alice@tenant.test", ["a@rcpt.test"], BODY)
        refused = await session.deliver("alice@tenant.test", ["nobody@rcpt.test"], BODY)
        await session.reset()  # a kept session, proven alive
        last = await session.deliver("alice@tenant.test", ["c@rcpt.test"], BODY)
        assert delivered(first) and delivered(last)
        nobody = failure(refused["nobody@rcpt.test"])
        assert (nobody.permanent, nobody.words) == (
            True,
            "550 5.1.1 no such user (in reply to RCPT TO)",
        )
        assert session.transactions == 3
        await session.quit()

    with aiosmtpd(recorder) as port:
        asyncio.run(run(port))
    assert [r.recipients for r in recorder.received] == [["a@rcpt.test"], ["c@rcpt.test"]]
    assert len({r.session for r in recorder.received}) == 1


def test_ipv6() -> None:
    recorder = Recorder()

    async def run(port: int) -> None:
        session = await connect(port, address=IPv6Address("::1"), source=IPv6Address("::1"))
        assert delivered(await session.deliver("alice@tenant.test", ["a@rcpt.test"], BODY))
        await session.quit()

    with aiosmtpd(recorder, host="::1") as port:
        asyncio.run(run(port))
    assert recorder.received[0].peer == "::1"


def test_connection_refused() -> None:
    refused = asyncio.run(failed_open(free_port()))
    assert (refused.kind, refused.stage, refused.words) == (
        Kind.REFUSED,
        Stage.CONNECT,
        "connection refused",
    )
    assert refused.connection_level and not refused.permanent


# --- STARTTLS -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "state"), [(TlsMode.MAY, TlsState.MAY), (TlsMode.VERIFY, TlsState.VERIFIED)]
)
def test_starttls(pki: Pki, mode: TlsMode, state: TlsState) -> None:
    recorder = Recorder()

    async def run(port: int) -> None:
        session = await connect(port, tls=mode, contexts=pki.contexts())
        assert session.tls is state
        assert delivered(await session.deliver("alice@tenant.test", ["a@rcpt.test"], BODY))
        await session.quit()

    with aiosmtpd(recorder, tls_context=pki.server) as port:
        asyncio.run(run(port))
    assert recorder.received[0].tls


def test_verify_never_falls_back_to_clear_text(pki: Pki) -> None:
    recorder = Recorder()
    with aiosmtpd(recorder, tls_context=pki.server) as port:
        wrong = asyncio.run(
            failed_open(port, tls=TlsMode.VERIFY, contexts=pki.contexts(), server_name="other.test")
        )
    with aiosmtpd(recorder) as port:
        missing = asyncio.run(failed_open(port, tls=TlsMode.VERIFY, contexts=pki.contexts()))
    assert (wrong.kind, wrong.stage) == (Kind.TLS, Stage.TLS)
    assert wrong.words.startswith("TLS handshake failed: certificate verify failed: ")
    assert "Error" not in wrong.words and not wrong.permanent
    assert (missing.kind, missing.stage) == (Kind.TLS, Stage.EHLO)
    assert missing.words == "TLS is required, but the server does not offer STARTTLS"
    assert recorder.received == []


# --- scripted servers ------------------------------------------------------------------

Handler = Callable[[Reader, Writer], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[int]:
    """An asyncio server on 127.0.0.1 running `handler` per connection; yields its port."""

    async def serve(reader: Reader, writer: Writer) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def greet(
    reader: Reader, writer: Writer, ehlo: bytes = b"250-mx\r\n250 PIPELINING\r\n"
) -> None:
    writer.write(b"220 mx.rcpt.test ESMTP\r\n")
    await reader.readline()
    writer.write(ehlo)


async def until_dot(reader: Reader) -> None:
    while await reader.readline() not in (b".\r\n", b""):
        pass


async def one(handler: Handler, test: Callable[[int], Awaitable[None]]) -> None:
    async with scripted(handler) as port:
        await test(port)


async def deliver_one(port: int, timeouts: Timeouts = FAST) -> Failure:
    session = await connect(port, timeouts=timeouts)
    results = await session.deliver("alice@tenant.test", ["a@rcpt.test"], BODY)
    assert not session.usable
    return failure(results["a@rcpt.test"])


def test_a_server_that_never_greets() -> None:
    async def silent(reader: Reader, writer: Writer) -> None:
        await reader.read()

    async def test(port: int) -> None:
        timeouts = Timeouts(greeting=0.2)
        silence = await failed_open(port, timeouts=timeouts)
        assert (silence.kind, silence.stage) == (Kind.TIMEOUT, Stage.GREETING)
        assert silence.words == "timed out after 0.2 s waiting for the greeting"

    asyncio.run(one(silent, test))


def test_a_trickled_reply_ends_at_the_stage_deadline() -> None:
    """One byte every 20 ms of an endless first line: a deadline per read would never
    pass, and the line bound would take minutes to reach."""

    async def trickle(reader: Reader, writer: Writer) -> None:
        writer.write(b"220-")
        for _ in range(3000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    async def test(port: int) -> None:
        slow = await failed_open(port, timeouts=Timeouts(greeting=0.3))
        assert (slow.kind, slow.stage) == (Kind.TIMEOUT, Stage.GREETING)

    asyncio.run(one(trickle, test))


def test_an_endless_reply_is_a_protocol_violation() -> None:
    async def flood(reader: Reader, writer: Writer) -> None:
        writer.write(b"220 mx\r\n")
        await reader.readline()
        for _ in range(10_000):
            writer.write(b"250-still here\r\n")
            await writer.drain()

    async def test(port: int) -> None:
        endless = await failed_open(port)
        assert (endless.kind, endless.stage) == (Kind.PROTOCOL, Stage.EHLO)
        assert "more than 100 lines" in endless.words

    asyncio.run(one(flood, test))


@pytest.mark.parametrize(
    ("greeting", "detail"),
    [
        (b"hello, this is not an SMTP greeting\r\n", "malformed reply line"),
        (b"220 mx\r\n250 unasked\r\n", "reply before the command"),
        (b"220-mx\r\n221 bye\r\n", "different codes"),
    ],
)
def test_a_garbled_greeting(greeting: bytes, detail: str) -> None:
    async def garble(reader: Reader, writer: Writer) -> None:
        writer.write(greeting)
        await reader.read()

    async def test(port: int) -> None:
        garbled = await failed_open(port)
        assert (garbled.kind, garbled.stage) == (Kind.PROTOCOL, Stage.GREETING)
        assert detail in garbled.words

    asyncio.run(one(garble, test))


def test_a_close_in_the_middle_of_a_reply() -> None:
    async def cut(reader: Reader, writer: Writer) -> None:
        writer.write(b"220-mx.rcpt.test\r\n220 ESM")

    async def test(port: int) -> None:
        cut_off = await failed_open(port)
        assert (cut_off.kind, cut_off.stage) == (Kind.DROPPED, Stage.GREETING)
        assert cut_off.words == (
            "connection closed by the server in the middle of a reply"
            " while waiting for the greeting"
        )

    asyncio.run(one(cut, test))


def test_421_at_mail_asks_to_slow_down() -> None:
    async def busy(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        await reader.readline()
        writer.write(b"421-4.7.28 [127.0.0.2] rate limited\r\n421 4.7.28 gsmtp\r\n")

    async def test(port: int) -> None:
        limited = await deliver_one(port)
        assert (limited.kind, limited.stage, limited.slow_down) == (Kind.REPLY, Stage.MAIL, True)
        assert limited.words == "421 4.7.28 [127.0.0.2] rate limited gsmtp (in reply to MAIL FROM)"

    asyncio.run(one(busy, test))


async def envelope(reader: Reader, writer: Writer) -> None:
    """Greet, read a pipelined MAIL, RCPT and DATA, accept them all."""
    await greet(reader, writer)
    for _ in range(3):
        await reader.readline()
    writer.write(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")


def test_a_drop_after_the_dot() -> None:
    async def drop(reader: Reader, writer: Writer) -> None:
        await envelope(reader, writer)
        await until_dot(reader)

    async def test(port: int) -> None:
        lost = await deliver_one(port)
        assert (lost.kind, lost.stage, lost.permanent) == (Kind.DROPPED, Stage.DOT, False)

    asyncio.run(one(drop, test))


def test_no_reply_after_the_dot() -> None:
    async def stall(reader: Reader, writer: Writer) -> None:
        await envelope(reader, writer)
        await until_dot(reader)
        await reader.read()

    async def test(port: int) -> None:
        silent = await deliver_one(port, Timeouts(dot=0.2))
        assert (silent.kind, silent.stage) == (Kind.TIMEOUT, Stage.DOT)

    asyncio.run(one(stall, test))


def test_a_write_that_does_not_drain() -> None:
    """The server stops reading after 354: the data block deadline ends the session."""

    async def deaf(reader: Reader, writer: Writer) -> None:
        await envelope(reader, writer)
        await asyncio.sleep(30)

    async def test(port: int) -> None:
        big = Message.of(b"Subject: big\n\n" + (b"y" * 998 + b"\n") * 32_000)
        session = await connect(port, timeouts=Timeouts(block=0.3))
        results = await session.deliver("alice@tenant.test", ["a@rcpt.test"], big)
        stuck = failure(results["a@rcpt.test"])
        assert (stuck.kind, stuck.stage) == (Kind.TIMEOUT, Stage.MESSAGE)
        assert stuck.words == "timed out after 0.3 s sending the message"

    asyncio.run(one(deaf, test))


def test_commands_are_pipelined_when_offered() -> None:
    """The server answers nothing until it has read DATA: only a pipelining client, which
    sends MAIL, RCPT and DATA in one group, gets through."""
    lines: list[bytes] = []

    async def strict(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        while not lines or lines[-1] != b"DATA\r\n":
            lines.append(await reader.readline())
        writer.write(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        await until_dot(reader)
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.read()

    async def test(port: int) -> None:
        session = await connect(port)
        assert session.extensions.pipelining
        results = await session.deliver("alice@tenant.test", ["a@rcpt.test", "b@rcpt.test"], BODY)
        assert delivered(results)
        session.abort()

    asyncio.run(one(strict, test))
    assert lines == [
        b"MAIL FROM:<alice@tenant.test>\r\n",
        b"RCPT TO:<a@rcpt.test>\r\n",
        b"RCPT TO:<b@rcpt.test>\r\n",
        b"DATA\r\n",
    ]


def test_a_broken_handshake_is_a_tls_failure_and_clear_text_works_at_once() -> None:
    async def fake_tls(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer, b"250-mx\r\n250 STARTTLS\r\n")
        if (await reader.readline()).startswith(b"STARTTLS"):
            writer.write(b"220 go ahead\r\n")
            await writer.drain()
            await reader.read(1)  # the ClientHello
            writer.write(b"this is not TLS\r\n" * 10)
            await reader.read()
            return
        writer.write(b"502 5.5.2 unexpected\r\n")

    async def test(port: int) -> None:
        broken = await failed_open(port, tls=TlsMode.MAY)
        assert (broken.kind, broken.stage) == (Kind.TLS, Stage.TLS)
        assert broken.words.startswith("TLS handshake failed: ")
        assert not broken.connection_level
        session = await connect(port, tls=TlsMode.NONE)  # what the caller does next
        assert session.tls is TlsState.NONE
        session.abort()

    asyncio.run(one(fake_tls, test))


def test_an_idle_session_the_server_closes_tells_why() -> None:
    async def impatient(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        await asyncio.sleep(0.05)
        writer.write(b"421 4.4.2 mx.rcpt.test idle timeout\r\n")

    async def test(port: int) -> None:
        session = await connect(port)
        for _ in range(200):  # the 421 comes while nothing is asked
            if not session.usable:
                break
            await asyncio.sleep(0.01)
        results = await session.deliver("alice@tenant.test", ["a@rcpt.test"], BODY)
        idle = failure(results["a@rcpt.test"])
        assert (idle.stage, idle.slow_down) == (Stage.IDLE, True)
        assert session.failure == idle

    asyncio.run(one(impatient, test))


@pytest.mark.parametrize("polite", [True, False])
def test_quit_and_abort_leave_nothing_lingering(polite: bool) -> None:
    """Both end with a reset (SO_LINGER 0): no socket of the tenant's stays in FIN_WAIT
    or TIME_WAIT; quit says QUIT first and waits for the reply."""
    seen: list[bytes | str] = []

    async def watch(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        try:
            line = await reader.readline()
            seen.append(line)
            if line == b"QUIT\r\n":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
            seen.append(await reader.read())
        except ConnectionResetError:
            seen.append("reset")

    async def test(port: int) -> None:
        session = await connect(port)
        await (session.quit() if polite else asyncio.sleep(0))
        session.abort()
        for _ in range(200):
            if seen and seen[-1] in ("reset", b""):
                break
            await asyncio.sleep(0.01)

    asyncio.run(one(watch, test))
    assert seen == ([b"QUIT\r\n", "reset"] if polite else ["reset"])


@dataclass
class Shrinking:
    """A body of three chunks whose fifth read fails, as `FileBody` does when its queue
    file shrinks: the first pass (is the message ASCII?) succeeds, sending does not."""

    reads: int = 0

    @property
    def length(self) -> int:
        return 3 * CHUNK

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        if self.reads == 5:
            raise OSError(errno.EIO, "queue file changed while read")
        return (b"x" * 99 + b"\r\n") * (size // 101) + b"\r\n" * (size % 101 // 2)

    def after(self, offset: int) -> Shrinking:
        raise NotImplementedError


def test_a_queue_file_that_fails_mid_message_aborts_and_sends_no_torn_message() -> None:
    recorder = Recorder()

    async def run(port: int) -> None:
        session = await connect(port)
        message = Message(b"Subject: torn\r\n\r\n", Shrinking())
        with pytest.raises(OSError, match="queue file changed"):
            await session.deliver("alice@tenant.test", ["a@rcpt.test"], message)
        assert not session.usable

    with aiosmtpd(recorder) as port:
        asyncio.run(run(port))
    assert recorder.received == []


# --- Postfix's smtp-sink: many sessions at once ----------------------------------------


@pytest.mark.needs("smtp-sink")
def test_many_sessions_at_once_against_smtp_sink(tmp_path: Path) -> None:
    port = free_port()
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{port}", "128"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    async def sender(number: int) -> list[Results]:
        session = await connect(port)
        assert session.extensions.pipelining
        done = []
        for n in range(5):
            recipients = [f"r{number}.{n}.{i}@rcpt.test" for i in range(3)]
            done.append(await session.deliver(f"s{number}@tenant.test", recipients, BODY))
        await session.quit()
        return done

    async def run() -> list[list[Results]]:
        for _ in range(100):  # until it listens
            with contextlib.suppress(SessionError):
                await (await connect(port)).quit()
                break
            await asyncio.sleep(0.05)
        return await asyncio.gather(*(sender(n) for n in range(40)))

    try:
        outcome = asyncio.run(run())
    finally:
        sink.terminate()
        sink.wait()
        assert sink.stdout is not None
        sink.stdout.close()
    assert all(delivered(results) for per_session in outcome for results in per_session)
    assert sum(len(results) for per_session in outcome for results in per_session) == 600
