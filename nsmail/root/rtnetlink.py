"""Route netlink (rtnetlink) requests that build a tenant's network, encoded by hand.

A tenant needs about ten requests. Through pyroute2 each costs about 0.3 ms of Python and
a round trip of its own; here each is a few `struct.pack` calls, and all requests to one
namespace go to the kernel in one datagram and are acknowledged together (`execute`).
Pure except `execute`, which only sends and reads on a socket it is given.

Security: the supervisor builds these as root from the validated configuration; nothing
here reads tenant-written data.
"""

from __future__ import annotations

import os
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_NEWRULE = 32
RTM_DELRULE = 33
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_AF_SPEC = 26
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5
VETH_INFO_PEER = 1
IFLA_BRPORT_ISOLATED = 33
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02  # RFC 4862 DAD would make the address unusable for 1-2 s
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
FRA_SRC = 2
FRA_IIFNAME = 3
FRA_PRIORITY = 6
FR_ACT_PROHIBIT = 8
IFF_UP = 0x1
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst/src len, tos, table, ..., flags
_FIB_RULE = struct.Struct("=BBBBBBBBI")  # fib_rule_hdr: family, dst/src len, ..., action, flags


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + bytes(-length % 4)


def _name(kind: int, name: str) -> bytes:
    return _attr(kind, name.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


Request = tuple[int, int, bytes]  # message type, extra flags, body


def _link(body: bytes, flags: int = 0) -> Request:
    return RTM_NEWLINK, flags, body


def veth(host_ifname: str, peer_ifname: str, peer_index: int, peer_netns_fd: int) -> Request:
    """A veth pair whose peer is made directly in another namespace, with a fixed index."""
    peer = _IFINFO.pack(0, 0, peer_index, 0, 0) + _name(IFLA_IFNAME, peer_ifname)
    peer += _u32(IFLA_NET_NS_FD, peer_netns_fd)
    info = _name(IFLA_INFO_KIND, "veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
    body = _IFINFO.pack(0, 0, 0, 0, 0) + _name(IFLA_IFNAME, host_ifname)
    return _link(body + _attr(IFLA_LINKINFO, info), NLM_F_CREATE | NLM_F_EXCL)


def link_up(index: int = 0, ifname: str | None = None, master: int | None = None) -> Request:
    """Bring a link up (by index, or by name), optionally enslaved to `master`.

    Also asks for no IPv6 link-local address: the kernel applies that only after the
    link is up, so it holds only for a link without carrier yet (its peer still down).
    """
    body = _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP)
    if ifname is not None:
        body += _name(IFLA_IFNAME, ifname)
    if master is not None:
        body += _u32(IFLA_MASTER, master)
    mode = _attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))
    return _link(body + _attr(IFLA_AF_SPEC, _attr(socket.AF_INET6, mode)))


def isolated_bridge_port(ifname: str) -> Request:
    """Make a bridge port isolated: it exchanges frames only with non-isolated ports."""
    data = _attr(IFLA_BRPORT_ISOLATED, b"\1")
    info = _name(IFLA_INFO_SLAVE_KIND, "bridge") + _attr(IFLA_INFO_SLAVE_DATA, data)
    body = _IFINFO.pack(0, 0, 0, 0, 0) + _name(IFLA_IFNAME, ifname)
    return _link(body + _attr(IFLA_LINKINFO, info))


def address(
    index: int, addr: IPAddress, prefixlen: int, *, scope: int = RT_SCOPE_UNIVERSE
) -> Request:
    """Add an address; IPv6 ones without DAD."""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    flags = IFA_F_NODAD if addr.version == 6 else 0
    body = _IFADDR.pack(family, prefixlen, flags, scope, index)
    body += _attr(IFA_LOCAL, addr.packed) + _attr(IFA_ADDRESS, addr.packed)
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body


def route(dst: IPAddress, prefixlen: int, oif: int, gateway: IPAddress | None = None) -> Request:
    """Add a static route in the main table: via `gateway`, or on-link (link scope)."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    # IPv6 has no link-scope routes: the kernel keeps every IPv6 route universe-scoped.
    scope = RT_SCOPE_LINK if gateway is None and family == socket.AF_INET else RT_SCOPE_UNIVERSE
    body = _RTMSG.pack(family, prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope, RTN_UNICAST, 0)
    body += _attr(RTA_DST, dst.packed) + _u32(RTA_OIF, oif)
    if gateway is not None:
        body += _attr(RTA_GATEWAY, gateway.packed)
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body


def local_source_rule(source: IPAddress, priority: int, *, add: bool = True) -> Request:
    """A policy rule (or its removal) that refuses, with EACCES, packets this host itself
    makes with `source` as their source address. Any local user can bind an address the
    host does not have (IP_FREEBIND needs no privilege) and so speak as a tenant from the
    host namespace; a tenant's own packets come in from its link, never from "lo"."""
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    body = _FIB_RULE.pack(family, 0, source.max_prefixlen, 0, 0, 0, 0, FR_ACT_PROHIBIT, 0)
    body += _attr(FRA_SRC, source.packed) + _name(FRA_IIFNAME, "lo")
    body += _u32(FRA_PRIORITY, priority)
    if add:
        return RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, body
    return RTM_DELRULE, 0, body


def encode(requests: list[Request]) -> bytes:
    """One datagram of `requests`, each asking for an acknowledgement; sequence = position."""
    return b"".join(
        _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0)
        + body
        for seq, (kind, flags, body) in enumerate(requests)
    )


def errors(data: bytes) -> list[tuple[int, int]]:
    """(sequence, errno) of each acknowledgement in a datagram the kernel sent; errno 0: done."""
    found = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, seq, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
            found.append((seq, -code))
        offset += (length + 3) & ~3
    return found


def open_socket() -> socket.socket:
    """A route netlink socket in the calling thread's network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC)
    sock.bind((0, 0))
    return sock


def execute(sock: socket.socket, requests: list[Request]) -> None:
    """Send `requests` at once and wait for every acknowledgement.

    The kernel carries out each request even when an earlier one failed; the first
    failure is raised, as OSError with the kernel's errno.
    """
    sock.send(encode(requests))
    waiting = len(requests)
    failure: tuple[int, int] | None = None
    while waiting:
        for seq, code in errors(sock.recv(65536)):
            waiting -= 1
            if code and failure is None:
                failure = (seq, code)
    if failure is not None:
        seq, code = failure
        kind = {
            RTM_NEWLINK: "link",
            RTM_NEWADDR: "address",
            RTM_NEWROUTE: "route",
            RTM_NEWRULE: "rule",
            RTM_DELRULE: "rule",
        }
        what = kind.get(requests[seq][0], "request")
        raise OSError(code, f"netlink {what} request: {os.strerror(code)}")
