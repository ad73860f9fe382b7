"""nsmail's nftables table, rendered as `nft -f` input: tenants never reach the host itself.

A worker's namespace holds only its tenant's address, but the hosting machine is one hop
away: a service there that listens on a wildcard address (sshd, a database, a local MTA)
answers on every address of the host namespace, the gateways tenants route through
included. The table `inet nsmail`, in the host namespace, turns away every packet that
arrives for the host itself (the input hook) from an address in its sets `tenants4` and
`tenants6`. Mail to the world is forwarded, never input, and so is every ICMP error about
it. The host needs nothing else from tenants (DNS goes over a socketpair to the relay)
but IPv6 neighbour discovery: a tenant has no link-local address, so it resolves its
gateway, and answers the host's solicitations, from its own address.

Rejected, not dropped: the ICMP "administratively prohibited" ends a worker's connect()
with EHOSTUNREACH (IPv4) or EACCES (IPv6) and says why, at once or at the first SYN
retransmission a second later (an ICMP error that meets the socket still locked by
connect() is dropped), where a drop would hold the worker for its whole timeout per
attempt, e.g. for an MX that is this very machine. The host's addresses are no secret
from a tenant whose gateway they are, and the kernel rate-limits the ICMP it sends.

With `[host] restrict_smtp`, the table also holds the output chain `restrict_smtp`: a
connection from the host namespace to port 25, 465 or 587 of another machine is refused
with a TCP reset unless its socket belongs to an exempt uid (root, and the host's own
mail worker), as cPanel's "SMTP Restrictions" do, so a tenant's user with a shell (or a
web app) cannot go around nsmail and send as the machine. Only a SYN is refused (the
match wants SYN without ACK): the packets of connections exempt uids opened, and those
of sockets without an owner (TIME_WAIT's last ACK), pass. A reset, not ICMP: the
connect() of a local socket ends at once with ECONNREFUSED, while an ICMP error for a
socket still locked by connect() waits for the SYN's first retransmission. Loopback
(`oif lo`, which carries the host's own addresses too) is not restricted: that is where
nsmail's own listener is. Workers send from their own namespaces and never meet it.

`table` replaces the whole table in one transaction (never a moment without it);
`changes` turns the sets' members from one set of addresses into another; `deletion`
removes the table. Another of nsmail's rule sets joins the table as chains of its own,
rendered in `table`; tenant changes touch only the two sets. `nsmail.root.nft` applies the
text; `nsmail.root.netns.HostNetwork` decides when.

Security: pure. Its input is the validated configuration's addresses as `ipaddress`
objects, so nothing but addresses reaches the rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address

TABLE = "inet nsmail"
TENANTS4 = "tenants4"
TENANTS6 = "tenants6"
SMTP_PORTS = (25, 465, 587)  # RFC 5321, RFC 8314, RFC 6409

_FROM_TENANTS = (
    "\tchain from_tenants {",
    "\t\ttype filter hook input priority filter; policy accept;",
    # RFC 4861 7.1.1, 7.1.2: neighbour solicitations and advertisements carry hop limit
    # 255, so these come from the link, never from further away.
    f"\t\tip6 saddr @{TENANTS6} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }}"
    " ip6 hoplimit 255 accept",
    f"\t\tip saddr @{TENANTS4} reject with icmpx admin-prohibited",
    f"\t\tip6 saddr @{TENANTS6} reject with icmpx admin-prohibited",
    "\t}",
)


def table(tenants: frozenset[IPAddress], exempt: frozenset[int] | None = None) -> str:
    """The whole table with `tenants` in its sets, replacing any table of that name; with
    `exempt` (uids), also the chain that keeps every other uid off remote SMTP ports."""
    four, six = _by_family(tenants)
    body = [
        *_set(TENANTS4, "ipv4_addr", four),
        *_set(TENANTS6, "ipv6_addr", six),
        *_FROM_TENANTS,
        *([] if exempt is None else _restrict_smtp(exempt)),
    ]
    return _replacing(f"table {TABLE} {{", *body, "}")


def _restrict_smtp(exempt: frozenset[int]) -> tuple[str, ...]:
    uids = ", ".join(str(uid) for uid in sorted(exempt))
    ports = ", ".join(str(port) for port in SMTP_PORTS)
    return (
        "\tchain restrict_smtp {",
        "\t\ttype filter hook output priority filter; policy accept;",
        "\t\toif lo accept",
        f"\t\tmeta skuid {{ {uids} }} accept",
        f"\t\ttcp dport {{ {ports} }} tcp flags & (syn | ack) == syn reject with tcp reset",
        "\t}",
    )


def changes(present: frozenset[IPAddress], wanted: frozenset[IPAddress]) -> str:
    """What turns sets holding `present` into sets holding `wanted`; "" if they do already."""
    lines = []
    for verb, addresses in (("add", wanted - present), ("delete", present - wanted)):
        four, six = _by_family(addresses)
        members: tuple[tuple[str, Sequence[IPAddress]], ...] = ((TENANTS4, four), (TENANTS6, six))
        lines += [f"{verb} element {TABLE} {name} {{ {_join(m)} }}" for name, m in members if m]
    return "".join(f"{line}\n" for line in lines)


def deletion() -> str:
    """What removes the table, whether or not it exists."""
    return _replacing()


def _replacing(*lines: str) -> str:
    # One `nft -f` input is one transaction. Declaring the table first makes it exist,
    # so that deleting it cannot fail; what follows builds it afresh.
    return "".join(f"{line}\n" for line in (f"table {TABLE} {{}}", f"delete table {TABLE}", *lines))


def _set(name: str, kind: str, members: Sequence[IPAddress]) -> list[str]:
    elements = [f"\t\telements = {{ {_join(members)} }}"] if members else []
    return [f"\tset {name} {{", f"\t\ttype {kind}", *elements, "\t}"]


def _by_family(addresses: frozenset[IPAddress]) -> tuple[list[IPv4Address], list[IPv6Address]]:
    four = sorted(a for a in addresses if isinstance(a, IPv4Address))
    six = sorted(a for a in addresses if isinstance(a, IPv6Address))
    return four, six


def _join(members: Sequence[IPAddress]) -> str:
    return ", ".join(str(a) for a in members)
