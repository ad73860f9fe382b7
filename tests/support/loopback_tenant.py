"""The tenant of the loopback tests and the zone its mail is routed by: tenant.test sends
from 127.0.0.5 (not a server's address, so the bind is visible), rcpt.test's MX listens on
127.0.0.1 and ::1, and a few domains route in each way MX routing can."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from nsmail.core.config import Tenant

ZONE = {
    ("rcpt.test.", "MX"): ["10 mx.rcpt.test."],
    ("mx.rcpt.test.", "A"): ["127.0.0.1"],
    ("mx.rcpt.test.", "AAAA"): ["::1"],
    ("backup.test.", "MX"): ["10 dead.backup.test.", "20 mx.rcpt.test."],
    ("dead.backup.test.", "A"): ["127.0.0.3"],
    ("implicit.test.", "A"): ["127.0.0.1"],
    ("noaddr.test.", "TXT"): ['"no mail here"'],
    ("nullmx.test.", "MX"): ["0 ."],
}
TENANT_IPV4 = IPv4Address("127.0.0.5")


def make_tenant(
    home: Path,
    ipv4: IPv4Address | None = TENANT_IPV4,
    ipv6: IPv6Address | None = None,
) -> Tenant:
    return Tenant(
        domain="tenant.test",
        ipv4=ipv4,
        ipv6=ipv6,
        ehlo="mail.tenant.test",
        uid=0,
        gid=0,
        home=home,
        users=("alice",),
        source="test",
    )
