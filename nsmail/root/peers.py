"""Who is on the other end of a local connection, in the kernel's words: the peer's uid.

A Unix socket's peer is SO_PEERCRED's (the credentials of the process that connected).
A loopback TCP peer is a socket of this machine's too, and sock_diag (NETLINK_SOCK_DIAG,
`inet_diag_req_v2`) names the uid that owns it: the request gives the peer socket's own
4-tuple (its address and port as local, ours as remote), so the kernel looks that one
socket up in its hash (`inet_diag_find_one_icsk`) and answers with it alone. pyroute2's
`DiagSocket.get_sock_stats` would dump every TCP socket of the namespace and filter them
in Python: per connection, that is O(sockets) for the busiest hosts; the exact request
is a few `struct` calls and one round trip, encoded by hand as `nsmail.root.rtnetlink`
is.

Only an ESTABLISHED peer counts. A client that connects and closes at once leaves a
TIME_WAIT or FIN_WAIT mini socket that sock_diag reports with uid 0; without the check it
would pass for root.

Security: runs as root in the supervisor, in the host namespace, where the listeners
are. It reads nothing the client sent; a peer that cannot be named is refused.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
TCP_ESTABLISHED = 1
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE, each half
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_REQUEST = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # inet_diag_sockid: ports and addresses, big-endian
_SOCKID_TAIL = struct.Struct("=III")  # ... interface, cookie
_MESSAGE = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans
_MESSAGE_TAIL = struct.Struct("=IIIII")  # ... expires, rqueue, wqueue, uid, inode
_ERROR = struct.Struct("=i")


class PeerUnknown(OSError):
    """The kernel does not name the peer (gone, not local, or not a connection)."""


def unix_peer_uid(conn: socket.socket) -> int:
    """The uid of the process that connected to a Unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


class Diag:
    """A NETLINK_SOCK_DIAG socket, opened in the namespace it is to look in."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        )
        self.sock.settimeout(1.0)  # the kernel answers at once; this bounds a surprise
        self._sequence = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def tcp_peer_uid(self, conn: socket.socket) -> int:
        """The uid owning the local socket at the other end of the accepted TCP `conn`."""
        peer, local = conn.getpeername(), conn.getsockname()
        sequence = next(self._sequence) & 0xFFFFFFFF
        self.sock.send(request(conn.family, peer[:2], local[:2], sequence))
        while True:
            reply = self.sock.recv(8192)
            found = answer(reply, sequence)
            if found is not None:
                return found


def request(family: int, peer: tuple[str, int], local: tuple[str, int], sequence: int) -> bytes:
    """The exact lookup of the socket whose own end is `peer`, connected to `local` (pure)."""
    body = (
        _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED)
        + _SOCKID.pack(peer[1], local[1], _packed(peer[0]), _packed(local[0]))
        + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
    )
    return (
        _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, sequence, 0)
        + body
    )


def answer(reply: bytes, sequence: int) -> int | None:
    """The uid in the kernel's `reply` to request `sequence`; None for a reply to another
    (a stale one); PeerUnknown if there is no such established socket (pure)."""
    if len(reply) < _HEADER.size:
        raise PeerUnknown("short sock_diag reply")
    length, kind, _, got, _ = _HEADER.unpack_from(reply)
    if got != sequence:
        return None
    body = reply[_HEADER.size : length]
    if kind == NLMSG_ERROR:
        (error,) = _ERROR.unpack_from(body)
        raise PeerUnknown(-error, "sock_diag found no such socket")
    if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MESSAGE.size + 48 + _MESSAGE_TAIL.size:
        raise PeerUnknown("unexpected sock_diag reply")
    _, state, _, _ = _MESSAGE.unpack_from(body)
    _, _, _, uid, inode = _MESSAGE_TAIL.unpack_from(body, _MESSAGE.size + 48)
    if state != TCP_ESTABLISHED or inode == 0:
        raise PeerUnknown("the peer is not an established socket")
    return int(uid)


def _packed(address: str) -> bytes:
    """An address as inet_diag_sockid holds it: 16 octets, IPv4 in the first four."""
    return ipaddress.ip_address(address.partition("%")[0]).packed.ljust(16, b"\0")
