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


def table(tenants: frozenset[IPAddress]) -> str:
    """The whole table with `tenants` in its sets, replacing any table of that name."""
    four, six = _by_family(tenants)
    body = [
        *_set(TENANTS4, "ipv4_addr", four),
        *_set(TENANTS6, "ipv6_addr", six),
        *_FROM_TENANTS,
    ]
    return _replacing(f"table {TABLE} {{", *body, "}")


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
