"""The DNS relay and the worker's resolver, end to end over real sockets on loopback.

Also home of the DNS test stack (an authoritative test server plus a relay process) that the
delivery and worker tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import socketserver
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

import dns.asyncresolver
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from nsmail.host import dnsrelay
from nsmail.tenant.resolver import BACKEND, make_resolver, use_relay

Zone = Mapping[tuple[str, str], Sequence[str]]

RCPT_ZONE: Zone = {
    ("rcpt.test.", "MX"): ["10 mx.rcpt.test."],
    ("mx.rcpt.test.", "A"): ["127.0.0.1"],
    ("mx.rcpt.test.", "AAAA"): ["::1"],
    ("big.rcpt.test.", "A"): [f"198.51.100.{i}" for i in range(1, 120)],
}


class _AuthHandler(socketserver.BaseRequestHandler):
    server: _UDPServer | _TCPServer

    def handle(self) -> None:
        if isinstance(self.server, _UDPServer):
            data, sock = self.request
            reply = self.server.stack.answer(data, udp=True)
            if reply is not None:
                sock.sendto(reply, self.client_address)
            return
        sock = self.request
        length = struct.unpack("!H", _recv_exactly(sock, 2))[0]
        reply = self.server.stack.answer(_recv_exactly(sock, length), udp=False)
        if reply is not None:
            sock.sendall(struct.pack("!H", len(reply)) + reply)


class _UDPServer(socketserver.UDPServer):
    stack: AuthServer


class _TCPServer(socketserver.TCPServer):
    stack: AuthServer
    allow_reuse_address = True


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


UDP = TypeVar("UDP", bound=socketserver.UDPServer)
TCP = TypeVar("TCP", bound=socketserver.TCPServer)


def udp_and_tcp(
    udp_class: type[UDP], tcp_class: type[TCP], handler: type[socketserver.BaseRequestHandler]
) -> tuple[UDP, TCP]:
    """A UDP and a TCP server on 127.0.0.1 and one port (free for both), as DNS wants."""
    for _ in range(20):
        udp = udp_class(("127.0.0.1", 0), handler)
        try:
            return udp, tcp_class(("127.0.0.1", udp.server_address[1]), handler)
        except OSError:
            udp.server_close()
    raise RuntimeError("no free port for UDP and TCP")


@dataclass
class AuthServer:
    """A tiny authoritative server for `zone` on 127.0.0.1, UDP and TCP on one port."""

    zone: Zone
    queries: list[tuple[str, str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        udp, tcp = udp_and_tcp(_UDPServer, _TCPServer, _AuthHandler)
        self.udp, self.tcp = udp, tcp
        udp.stack = tcp.stack = self
        self.port: int = udp.server_address[1]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for server in (self.udp, self.tcp):
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        for server in (self.udp, self.tcp):
            if self._threads:
                server.shutdown()
            server.server_close()

    def answer(self, wire: bytes, udp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype, udp))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        records = self.zone.get((name, rdtype))
        if records:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 300, "IN", rdtype, list(records))
            )
        elif not any(owner == name for owner, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        reply = response.to_wire(max_size=65535)
        if udp and len(reply) > 512:
            response.answer = []
            response.flags |= dns.flags.TC
            reply = response.to_wire()
        return reply


def resolve(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> dns.resolver.Answer:
    """One lookup with the worker's asynchronous resolver, from synchronous test code."""
    return asyncio.run(resolver.resolve(name, rdtype, backend=BACKEND))


@dataclass
class DNSStack:
    """An AuthServer and a relay process (chrooted into an empty directory when root)."""

    server: AuthServer
    control: socket.socket
    relay_pid: int
    channels: list[socket.socket] = field(default_factory=list)
    relay_status: int | None = None

    def channel(self) -> socket.socket:
        """A new worker end, its other end already handed to the relay."""
        worker_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with relay_end:
            dnsrelay.hand_over(self.control, relay_end)
        self.channels.append(worker_end)
        return worker_end

    def resolver(self, timeout: float = 3.0) -> dns.asyncresolver.Resolver:
        resolver = make_resolver()
        use_relay(resolver, self.channel(), timeout)
        return resolver

    def relay_alive(self) -> bool:
        if self.relay_status is None:
            pid, status = os.waitpid(self.relay_pid, os.WNOHANG)
            if pid:
                self.relay_status = status
        return self.relay_status is None

    def wait_relay(self, timeout: float = 5) -> int:
        """The relay's exit status; killed if it does not exit within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.relay_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.relay_status is None:
            os.kill(self.relay_pid, signal.SIGKILL)
            self.relay_status = os.waitpid(self.relay_pid, 0)[1]
        return self.relay_status


@contextlib.contextmanager
def dns_stack(
    zone: Zone = RCPT_ZONE,
    resolvers: Sequence[IPv4Address | IPv6Address] = (IPv4Address("127.0.0.1"),),
    timeout: float = 1.0,
) -> Iterator[DNSStack]:
    server = AuthServer(zone)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tempfile.TemporaryDirectory() as empty:
        pid = os.fork()
        if pid == 0:  # the relay process
            code = 1
            try:
                mine.close()
                server.udp.server_close()
                server.tcp.server_close()
                if os.geteuid() == 0:
                    os.chroot(empty)
                    os.chdir("/")
                dnsrelay.run(theirs, resolvers, timeout, port=server.port)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        stack = DNSStack(server, mine, pid)
        try:
            server.start()
            yield stack
        finally:
            for channel in stack.channels:
                channel.close()
            mine.close()
            server.close()
            stack.wait_relay()


@pytest.fixture
def stack() -> Iterator[DNSStack]:
    with dns_stack() as s:
        yield s


def _ask(channel: socket.socket, query: dns.message.Message | bytes) -> dns.message.Message:
    channel.send(query if isinstance(query, bytes) else query.to_wire())
    channel.settimeout(5)
    return dns.message.from_wire(channel.recv(65535))


def test_mx_and_address_lookups(stack: DNSStack) -> None:
    resolver = stack.resolver()
    mx = resolve(resolver, "rcpt.test.", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in mx] == [(10, "mx.rcpt.test.")]
    assert [r.address for r in resolve(resolver, "mx.rcpt.test.", "A")] == ["127.0.0.1"]
    assert [r.address for r in resolve(resolver, "mx.rcpt.test.", "AAAA")] == ["::1"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(resolver, "nowhere.test.", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(resolver, "rcpt.test.", "A")


def test_truncated_answers_are_fetched_over_tcp(stack: DNSStack) -> None:
    answer = resolve(stack.resolver(), "big.rcpt.test.", "A")
    assert len(answer) == 119
    assert ("big.rcpt.test.", "A", False) in stack.server.queries


def test_queries_are_answered_from_the_cache(stack: DNSStack) -> None:
    resolver = stack.resolver()
    resolve(resolver, "rcpt.test.", "MX")
    resolve(resolver, "rcpt.test.", "MX")
    assert stack.server.queries.count(("rcpt.test.", "MX", True)) == 1


def test_lookups_at_once_share_one_channel(stack: DNSStack) -> None:
    """A busy worker asks for many destinations at once over its one channel: each
    answer reaches the lookup it answers, whatever order the relay answers in."""
    resolver = stack.resolver()
    resolver.cache = None  # every lookup goes to the relay
    names = [("mx.rcpt.test.", "A"), ("mx.rcpt.test.", "AAAA"), ("rcpt.test.", "MX")] * 10

    async def all_at_once() -> list[dns.resolver.Answer]:
        lookups = [resolver.resolve(n, t, backend=BACKEND) for n, t in names]
        return await asyncio.gather(*lookups)

    answers = asyncio.run(all_at_once())
    assert [(str(a.qname), dns.rdatatype.to_text(a.rdtype)) for a in answers] == names
    assert [a[0].to_text() for a in answers[:3]] == ["127.0.0.1", "::1", "10 mx.rcpt.test."]


def test_only_plain_in_queries_are_relayed(stack: DNSStack) -> None:
    channel = stack.channel()
    chaos = dns.message.make_query("version.bind.", "TXT", "CH")
    assert _ask(channel, chaos).rcode() == dns.rcode.REFUSED
    update = dns.message.make_query("rcpt.test.", "MX")
    update.set_opcode(dns.opcode.UPDATE)
    assert _ask(channel, update).rcode() == dns.rcode.NOTIMP
    axfr = dns.message.make_query("rcpt.test.", "AXFR")
    assert _ask(channel, axfr).rcode() == dns.rcode.REFUSED
    two = dns.message.make_query("rcpt.test.", "MX")
    two.question.append(two.question[0])
    assert _ask(channel, two).rcode() == dns.rcode.REFUSED
    garbage = b"\x12\x34\x01\x00" + os.urandom(8) + b"\xff" * 20
    assert _ask(channel, garbage).rcode() == dns.rcode.FORMERR
    query = dns.message.make_query("rcpt.test.", "MX")
    response = _ask(channel, query)
    assert response.id == query.id and query.is_response(response)
    assert stack.server.queries == [("rcpt.test.", "MX", True)]


def test_garbage_flood_and_eof_on_one_channel_spare_the_others(stack: DNSStack) -> None:
    bad = stack.channel()
    good = stack.resolver()
    for size in (0 + 1, 11, 12, 200, 512, 513, 4000):
        bad.send(os.urandom(size))
    query = dns.message.make_query("rcpt.test.", "MX")
    bad.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(2000):  # far beyond the in-flight bound, never reading answers
            bad.send(query.to_wire())
    assert resolve(good, "mx.rcpt.test.", "A")[0].address == "127.0.0.1"
    bad.close()
    assert resolve(good, "mx.rcpt.test.", "AAAA")[0].address == "::1"
    assert stack.relay_alive()


def test_a_descriptor_that_is_no_channel_is_dropped(stack: DNSStack) -> None:
    read_end, write_end = os.pipe()
    stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        socket.send_fds(stack.control, [b"c"], [read_end, stream_a.fileno()])
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        stream_a.close()
        stream_b.close()
    assert resolve(stack.resolver(), "rcpt.test.", "MX")[0].preference == 10


def test_resolvers_are_tried_in_turn_and_failure_is_servfail() -> None:
    dead = IPv4Address("127.0.0.2")  # nothing listens there: refused at once
    with dns_stack(resolvers=(dead, IPv4Address("127.0.0.1")), timeout=0.2) as s:
        assert resolve(s.resolver(), "rcpt.test.", "MX")[0].preference == 10
    with dns_stack(resolvers=(dead,), timeout=0.2) as s:
        response = _ask(s.channel(), dns.message.make_query("rcpt.test.", "MX"))
        assert response.rcode() == dns.rcode.SERVFAIL
        with pytest.raises(dns.resolver.NoNameservers):
            resolve(s.resolver(), "rcpt.test.", "MX")


def test_relay_gone_fails_fast() -> None:
    with dns_stack() as s:
        resolver = s.resolver()
        s.control.close()
        assert s.wait_relay() == 0
        started = time.monotonic()
        with pytest.raises(dns.resolver.NoNameservers):
            resolve(resolver, "rcpt.test.", "MX")
        assert time.monotonic() - started < 1


def test_relay_returns_when_control_reaches_eof() -> None:
    with dns_stack() as s:
        resolver = s.resolver()
        assert resolve(resolver, "rcpt.test.", "MX")[0].preference == 10
        s.control.shutdown(socket.SHUT_WR)
        assert s.wait_relay() == 0


def test_a_ping_is_answered_on_the_control_socket(stack: DNSStack) -> None:
    """What the supervisor's health check asks: the relay's loop answers, between queries."""
    resolver = stack.resolver()
    stack.control.settimeout(5)
    for _ in range(3):
        dnsrelay.ping(stack.control)
        assert stack.control.recv(16) == dnsrelay.PING
        assert resolve(resolver, "rcpt.test.", "MX")[0].preference == 10
