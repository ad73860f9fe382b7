"""Configuration texts and a fake system to parse them against: users, the inodes of their
homes and the default resolvers, as `config.parse` asks for them, and a small TOML writer."""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from pathlib import PurePosixPath

from nsmail.core.config import Account, Inode, SystemLookup

MAIN = "/etc/nsmail/nsmail.toml"
DROPIN = "/etc/nsmail/tenants.d/cde.toml"

USERS = {
    "nsmail": Account(990, 990, "/var/lib/nsmail"),
    "nsmail-dns": Account(991, 991, "/nonexistent"),
    "bcd": Account(1001, 1001, "/srv/tenants/bcd"),
    "cde": Account(1002, 1002, "/srv/tenants/cde"),
    "bcd-twin": Account(1001, 1001, "/srv/tenants/twin"),
    "toor": Account(0, 1000, "/srv/tenants/toor"),
    "wheel": Account(1003, 0, "/srv/tenants/wheel"),
    "nohome": Account(1004, 1004, "/nonexistent"),
}


def tree(homes: Mapping[str, int]) -> Callable[[str], Inode | None]:
    """`lstat` of a file system holding `homes` (path: owner, mode 0700) and, above them,
    directories of root's with mode 0755."""
    above = {str(parent) for home in homes for parent in PurePosixPath(home).parents}

    def lstat(path: str) -> Inode | None:
        if path in homes:
            return Inode(homes[path], stat.S_IFDIR | 0o700)
        return Inode(0, stat.S_IFDIR | 0o755) if path in above else None

    return lstat


HOMES = {a.home: a.uid for a in USERS.values() if a.home != "/nonexistent"} | {"/srv/other": 2000}

LOOKUP = SystemLookup(
    user=USERS.get,
    lstat=tree(HOMES),
    default_resolvers=lambda: (IPv4Address("198.51.100.53"),),
)

HOST = '[host]\nname = "abc.test"\n'
BRIDGE = (
    '[network]\nbridge = "nsbr0"\ngateway4 = "198.51.100.1"\ngateway6 = "2001:db8:51::1"\n'
    'subnet4 = "198.51.100.0/24"\nsubnet6 = "2001:db8:51::/64"\n'
)
BCD = '[[tenant]]\ndomain = "bcd.test"\nipv4 = "198.51.100.70"\nuser = "bcd"\n'
CDE = '[[tenant]]\ndomain = "cde.test"\nipv6 = "2001:db8:51::71"\nuser = "cde"\n'
GOOD_MAIN = HOST + BRIDGE + BCD


def tenant(**fields: object) -> str:
    """A [[tenant]] table: bcd.test's fields, overridden (None drops a field)."""
    merged: dict[str, object] = {"domain": "bcd.test", "ipv4": "198.51.100.70", "user": "bcd"}
    merged.update(fields)
    lines = [f"{key} = {toml_value(value)}" for key, value in merged.items() if value is not None]
    return "[[tenant]]\n" + "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    """Just enough of a TOML writer for tests."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    pairs = (f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
    return "{" + ", ".join(pairs) + "}"


def toml_string(text: str) -> str:
    # TOML basic strings take every character raw except quote, backslash and controls.
    escaped = (
        f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in text
    )
    return '"' + "".join(escaped) + '"'
