"""DNS servers for the loopback tests: a tiny authoritative server for a zone given as a
mapping, on 127.0.0.1 over UDP and TCP, and the stack the workers' resolvers use in the
tests, that server behind a real DNS relay process (chrooted into an empty directory when
root)."""

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
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset

from nsmail.host import dnsrelay
from nsmail.tenant.resolver import BACKEND, Resolver, make_resolver, use_relay

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
    # Answers as a validating resolver gives them (RFC 6840 5.7): AD set when asked for.
    validating: bool = False
    dnssec_wishes: list[tuple[bool, bool]] = field(default_factory=list)  # (AD, DO) asked

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
        wants = (bool(query.flags & dns.flags.AD), bool(query.ednsflags & dns.flags.DO))
        self.dnssec_wishes.append(wants)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.validating and any(wants):
            response.flags |= dns.flags.AD
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


def resolve(resolver: Resolver, name: str, rdtype: str) -> dns.resolver.Answer:
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

    def resolver(self, timeout: float = 3.0) -> Resolver:
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
    validating: bool = False,
) -> Iterator[DNSStack]:
    server = AuthServer(zone, validating=validating)
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
