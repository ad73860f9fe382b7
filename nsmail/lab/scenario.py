"""What `nsmail demo` puts into the lab and what it shows of it (pure: no IO).

Three tenants on the lab's bridge (one of them IPv6 only), their DNS and the nsmail
configuration of the hosting machine; then, from the receiver's verdicts, one report per
tenant and the side-by-side table a person reads.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsmail.lab.dnsserver import Record, forward_and_reverse
from nsmail.lab.receiver import address_literal
from nsmail.lab.topology import (
    BRIDGE,
    BRIDGE_V4,
    BRIDGE_V6,
    DNS_V4,
    HOST_NAME,
    HOST_V4,
    MX_NAME,
    RECIPIENT_DOMAIN,
    TENANT_SUBNET4,
    TENANT_SUBNET6,
    Names,
    lab_records,
)

# The lab's namespaces are demohost and demonet, and the supervisor (configured with the
# same prefix) names its tenants' demo-<domain>: it removes every demo-* as stale, so the
# lab's own namespaces must not be named demo-host and demo-net.
NAMES = Names("demo")
NSMAIL_RCPT = f"x1@{RECIPIENT_DOMAIN}"
NAIVE_RCPT = f"x2@{RECIPIENT_DOMAIN}"
TABLE_WIDTH = 100


@dataclass(frozen=True, slots=True)
class DemoTenant:
    domain: str
    ipv4: str | None
    ipv6: str | None

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a)


TENANTS = (
    DemoTenant("bcd.test", "198.51.100.70", "2001:db8:51::70"),
    DemoTenant("cde.test", "198.51.100.71", None),
    DemoTenant("def.test", None, "2001:db8:51::72"),
)


def dns_records(tenants: Sequence[DemoTenant]) -> list[Record]:
    """Forward and reverse DNS for the hosting machine, the receiving MX and the tenants."""
    tenant_records = (forward_and_reverse(t.domain, a) for t in tenants for a in t.addresses)
    return lab_records() + list(itertools.chain.from_iterable(tenant_records))


def config_path(tmp: Path) -> Path:
    """Where the demo run with temporary directory `tmp` keeps its nsmail configuration."""
    return tmp / "etc" / "nsmail.toml"


def home_of(tmp: Path, tenant: DemoTenant) -> Path:
    return tmp / "tenants" / tenant.domain


def config_text(tmp: Path, tenants: Sequence[DemoTenant], uids: Sequence[int]) -> str:
    """The nsmail configuration of the lab's hosting machine."""
    text = f"""\
[host]
name = "{HOST_NAME}"
resolvers = ["{DNS_V4}"]
run_dir = "{tmp / "run"}"

[network]
mode = "bridge"
bridge = "{BRIDGE}"
gateway4 = "{BRIDGE_V4}"
gateway6 = "{BRIDGE_V6}"
subnet4 = "{TENANT_SUBNET4}"
subnet6 = "{TENANT_SUBNET6}"
prefix = "{NAMES.prefix}"

[delivery]
scan_interval = 1
timeout = 5
"""
    for tenant, uid in zip(tenants, uids, strict=True):
        text += f'\n[[tenant]]\ndomain = "{tenant.domain}"\n'
        text += "".join(
            f'{key} = "{value}"\n'
            for key, value in (("ipv4", tenant.ipv4), ("ipv6", tenant.ipv6))
            if value
        )
        text += f'uid = {uid}\ngid = {uid}\nhome = "{home_of(tmp, tenant)}"\nusers = ["alice"]\n'
    return text


def outcome(verdict: dict[str, Any]) -> dict[str, Any]:
    """What the receiver did with one message: its Received clause, or its refusal."""
    if verdict["accepted"]:
        return {"received": verdict["received"], "verified": verdict["verified"]}
    return {"refused": verdict["reason"], "verified": verdict["verified"]}


def tenant_report(
    tenant: DemoTenant, naive: dict[str, Any], sent: dict[str, Any]
) -> dict[str, Any]:
    """One tenant's line of the report; `clean` means the receiver saw exactly the tenant."""
    literals = {f"[{address_literal(a)}]" for a in tenant.addresses}
    # The receiver verified the tenant's own name for one of the tenant's own addresses.
    clean = any(
        sent.get("received") == f"from {tenant.domain} ({tenant.domain} {lit})" for lit in literals
    )
    return {
        "domain": tenant.domain,
        "addresses": list(tenant.addresses),
        "naive": outcome(naive),
        "nsmail": {**outcome(sent), "clean": clean},
    }


def _cell(result: dict[str, Any]) -> str:
    return result["received"] if "received" in result else f"refused: {result['refused']}"


def render_comparison(tenants: Sequence[dict[str, Any]], width: int = TABLE_WIDTH) -> str:
    """The side-by-side table; cells that do not fit their column wrap onto more lines."""
    head = ("TENANT", f"THE USUAL WAY: from {HOST_NAME}'s address", "WITH NSMAIL")
    rows = [(t["domain"], _cell(t["naive"]), _cell(t["nsmail"])) for t in tenants]
    first = max(len(r[0]) for r in [head, *rows])
    third = max(len(r[2]) for r in [head, *rows])
    second = min(max(len(r[1]) for r in [head, *rows]), width - first - third - 4)
    lines = []
    for row in [head, *rows]:
        widths = (first, second, third)
        cells = [textwrap.wrap(c, w) or [""] for c, w in zip(row, widths, strict=True)]
        for parts in itertools.zip_longest(*cells, fillvalue=""):
            padded = (p.ljust(w) for p, w in zip(parts, widths, strict=True))
            lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def render(report: dict[str, Any], status_table: str) -> str:
    """What a person reads at the end of the demo."""
    policy = (
        "Policy (--strict): refuse a HELO that is not that name."
        if report["strict"]
        else "Policy: accept all (--strict refuses a HELO that is not that name)."
    )
    return "\n".join(
        [
            f"How {MX_NAME} saw each message: 'from HELO (name [address])' in the Received header",
            "it wrote, the name being the client's forward-confirmed reverse DNS name.",
            policy,
            "",
            render_comparison(report["tenants"]),
            "",
            f"The usual way, every tenant connects from {HOST_V4}, whose name is {HOST_NAME}:",
            "its HELO cannot match. With nsmail each tenant connects from its own address,",
            "whose name is the tenant's own.",
            "",
            "nsmail status:",
            status_table,
        ]
    )
