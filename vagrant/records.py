"""The rig's DNS records as nsmail.lab.dnsserver reads them, from /etc/default/nsmail-rig.

A and AAAA with the matching PTR for every name (the hosting machine, the mx, each tenant),
MX for every mail domain (the recipient domain's is the mx; the others name themselves).
"""

import ipaddress
import json
import sys
from pathlib import Path


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


def records(env: dict[str, str]) -> list[list[str]]:
    named = [(env["RIG_HOST_NAME"], env["RIG_HOST_V4"]), (env["RIG_HOST_NAME"], env["RIG_HOST_V6"])]
    named += [(env["RIG_MX_NAME"], env["RIG_MX_V4"]), (env["RIG_MX_NAME"], env["RIG_MX_V6"])]
    for tenant in env["RIG_TENANTS"].split():
        domain, *addresses = tenant.split(",")
        named += [(domain, a) for a in addresses if a]
    result = [[env["RIG_RCPT_DOMAIN"], "MX", f"10 {env['RIG_MX_NAME']}"]]
    for name in dict.fromkeys(n for n, _ in named):
        if name != env["RIG_MX_NAME"]:
            result.append([name, "MX", f"10 {name}"])
    for name, address in named:
        rtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
        result += [[name, rtype, address], [address, "PTR", name]]
    return result


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/etc/default/nsmail-rig")
    json.dump(records(read_env(path)), sys.stdout, indent=1)
    print()
