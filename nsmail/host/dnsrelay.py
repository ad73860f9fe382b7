"""The DNS relay: one unprivileged host process answering every worker's queries.

Workers cannot reach the host resolver from their namespaces, and must not get a general
path to host services. Each worker instead holds one end of a SEQPACKET socketpair whose
other end the supervisor passes here over the control socket (SCM_RIGHTS). The relay reads
one DNS query per datagram, rebuilds it from its question and its DNSSEC wishes alone (the
AD and DO bits: RFC 6840 5.7, RFC 3225), asks the configured resolvers (UDP, TCP on
truncation, each resolver in turn) and answers with the response, SERVFAIL on failure and
REFUSED for anything that is not a plain IN query. A response's AD bit (the resolver
validated it with DNSSEC) is passed on only from a resolver on the loopback: a stub may
trust AD only over a path nobody else can write to (RFC 6840 5.7, RFC 4035 4.9.3), and
DANE (nsmail.tenant.policies) relies on it; from any other resolver it is cleared. The
supervisor pings the relay over the control socket (`ping`), and replaces one that does
not answer.

Security: runs in the host network namespace as a system user of its own (`[host]
dns_user`: no other process, the host's worker included, may signal it). Every byte on a
channel is tenant-written: a query is size-bounded, parsed by dnspython and never
forwarded verbatim (no tunnelled flags, options or extra records reach the resolver: the
question, RD, AD and DO are all that is kept).
Each channel has a bounded number of queries in flight and stops being read while it is
at the bound; a failing or closed channel is dropped on its own, never the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

HEADER_SIZE = 12
MAX_QUERY = 512
MAX_IN_FLIGHT = 8
MAX_FDS_PER_MESSAGE = 16
# Answers travel over SEQPACKET, not UDP, so ask the resolver for what fits a DNS message.
UPSTREAM_PAYLOAD = 1232
PING = b"p"  # on the control socket, without descriptors; answered with the same
MAX_RESPONSE = 65535
# The header's fourth byte: RA, Z, AD, CD and the RCODE (RFC 1035 4.1.1, RFC 4035 3.2);
# TC is in the third.
AD, RCODE, TC = 0x20, 0x0F, 0x02

log = logging.getLogger("nsmail.host.dnsrelay")

# The relay runs chrooted into an empty directory: load what dnspython imports lazily now,
# or record types would parse as generic rdata and the event loop backend would not load.
dns.rdata.load_all_types()  # type: ignore[no-untyped-call]
dns.asyncbackend.get_backend("asyncio")


def hand_over(control: socket.socket, channel: socket.socket) -> None:
    """Pass `channel` to the relay listening on `control`; the caller then closes its copy."""
    socket.send_fds(control, [b"c"], [channel.fileno()])


def ping(control: socket.socket) -> None:
    """Ask the relay on `control` to show it is alive: it sends PING back from its loop."""
    control.send(PING)


def run(
    control: socket.socket,
    resolvers: Sequence[IPv4Address | IPv6Address],
    timeout: float,
    port: int = 53,
) -> None:
    """Serve channels handed over on `control` until it reaches end of file."""
    asyncio.run(_serve(control, tuple(str(r) for r in resolvers), timeout, port))


async def _serve(
    control: socket.socket, resolvers: tuple[str, ...], timeout: float, port: int
) -> None:
    control.setblocking(False)
    channels: set[asyncio.Task[None]] = set()
    try:
        while True:
            await _readable(control)
            try:
                message, fds, _, _ = socket.recv_fds(control, 1, MAX_FDS_PER_MESSAGE)
            except BlockingIOError:
                continue
            if not message and not fds:
                return
            if message == PING and not fds:
                with contextlib.suppress(OSError):  # a supervisor not reading asks again
                    control.send(PING)
            for fd in fds:
                channel = _adopt(fd)
                if channel is not None:
                    task = asyncio.create_task(_serve_channel(channel, resolvers, timeout, port))
                    channels.add(task)
                    task.add_done_callback(channels.discard)
    finally:
        for task in channels:
            task.cancel()
        await asyncio.gather(*channels, return_exceptions=True)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock, ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_reader(sock)


def _adopt(fd: int) -> socket.socket | None:
    """The received descriptor as a channel, or None (and closed) if it is not one."""
    try:
        channel = socket.socket(fileno=fd)
    except OSError:
        _close_fd(fd)
        return None
    if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_SEQPACKET:
        channel.close()
        return None
    channel.setblocking(False)
    return channel


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        socket.close(fd)


async def _serve_channel(
    channel: socket.socket, resolvers: tuple[str, ...], timeout: float, port: int
) -> None:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    queries: set[asyncio.Task[None]] = set()
    try:
        while True:
            await slots.acquire()
            try:
                wire = await loop.sock_recv(channel, MAX_QUERY + 1)
            except OSError:
                return
            if not wire:
                return
            task = asyncio.create_task(_answer(channel, wire, resolvers, timeout, port))
            queries.add(task)
            task.add_done_callback(queries.discard)
            task.add_done_callback(lambda _: slots.release())
    finally:
        for task in queries:
            task.cancel()
        await asyncio.gather(*queries, return_exceptions=True)
        channel.close()


async def _answer(
    channel: socket.socket, wire: bytes, resolvers: tuple[str, ...], timeout: float, port: int
) -> None:
    reply = await respond(wire, resolvers, timeout, port)
    if reply is None:
        return
    try:
        channel.send(reply)
    except OSError:
        # Full (the worker is not reading) or closed: the answer is dropped; the
        # channel's reader notices a closed peer on its own.
        return


async def respond(
    wire: bytes, resolvers: tuple[str, ...], timeout: float, port: int
) -> bytes | None:
    """The wire answer to the query `wire`, or None if it deserves none."""
    # RFC 1035 4.1.1: below 12 bytes there is no header to answer; a set QR bit marks a
    # response, and answering those could loop.
    if not HEADER_SIZE <= len(wire) <= MAX_QUERY or wire[2] & 0x80:
        return None
    if (wire[2] >> 3) & 0xF != dns.opcode.QUERY:
        return _header_only(wire, dns.rcode.NOTIMP)
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        # Whatever dnspython finds wrong with tenant bytes, the answer is FORMERR.
        return _header_only(wire, dns.rcode.FORMERR)
    if not _acceptable(query):
        return _error(query, dns.rcode.REFUSED)
    upstream = _rebuilt(query)
    for resolver in resolvers:
        try:
            answer = await _exchange(upstream, resolver, timeout, port)
        except Exception as e:
            # One resolver's failure, whatever its kind, only moves on to the next.
            log.warning("resolver %s: %r", resolver, e)
            continue
        if answer[3] & RCODE not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            continue
        flags = answer[3] if trusts_ad(resolver) else answer[3] & ~AD
        return struct.pack("!HBB", query.id, answer[2], flags) + answer[4:]
    return _error(query, dns.rcode.SERVFAIL)


async def _exchange(
    upstream: dns.message.QueryMessage, resolver: str, timeout: float, port: int
) -> bytes:
    """The resolver's response to `upstream`, as it sent it: over UDP, over TCP when
    truncated. Passed on as it came (with the worker's id, and AD as `trusts_ad` says):
    parsing every answer to write it out again was most of the relay's work, and the
    worker parses it anyway. Only its question is read here, to match it to `upstream`."""
    wire = await _udp(upstream, resolver, timeout, port)
    if not wire[2] & TC:
        return wire
    response = await dns.asyncquery.tcp(upstream, resolver, timeout=timeout, port=port)
    return response.to_wire()


async def _udp(
    upstream: dns.message.QueryMessage, resolver: str, timeout: float, port: int
) -> bytes:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ipaddress.ip_address(resolver).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((resolver, port))  # the kernel drops datagrams from anyone else
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, upstream.to_wire())
            while True:
                wire = await loop.sock_recv(sock, MAX_RESPONSE)
                if _answers(wire, upstream):
                    return wire


def _answers(wire: bytes, upstream: dns.message.QueryMessage) -> bool:
    """Whether `wire` is a response to `upstream` (its id, QR and question): anything
    else on the socket is ignored, as dnspython does."""
    if len(wire) < HEADER_SIZE:
        return False
    try:
        return upstream.is_response(dns.message.from_wire(wire, question_only=True))
    except Exception:  # whatever dnspython finds wrong with the bytes: not an answer
        return False


def _rebuilt(query: dns.message.Message) -> dns.message.QueryMessage:
    """The query to ask upstream: the worker's question, and whether it wants to know if
    the answer was validated (AD, RFC 6840 5.7) and its signatures (DO, RFC 3225)."""
    question = query.question[0]
    wants_dnssec = query.edns >= 0 and bool(query.ednsflags & dns.flags.DO)
    upstream = dns.message.make_query(
        question.name,
        question.rdtype,
        use_edns=0,
        payload=UPSTREAM_PAYLOAD,
        want_dnssec=wants_dnssec,
    )
    if query.flags & dns.flags.AD:
        upstream.flags |= dns.flags.AD
    return upstream


def trusts_ad(resolver: str) -> bool:
    """Whether `resolver`'s AD bit is believed: only over the loopback (RFC 6840 5.7)."""
    return ipaddress.ip_address(resolver).is_loopback


def _acceptable(query: dns.message.Message) -> bool:
    if len(query.question) != 1:
        return False
    question = query.question[0]
    return question.rdclass == dns.rdataclass.IN and not dns.rdatatype.is_metatype(question.rdtype)


def _header_only(wire: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A bare response header for a query dnspython cannot represent."""
    query_id, flags = struct.unpack_from("!HB", wire)
    # Keep the opcode and RD bits of the query, set QR (RFC 1035 4.1.1).
    return struct.pack("!HBBHHHH", query_id, 0x80 | (flags & 0x79), rcode, 0, 0, 0, 0)


def _error(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes | None:
    try:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return response.to_wire()
    except dns.exception.DNSException:
        return None
