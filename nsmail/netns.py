"""Tenant network namespaces: create, wire and remove them with in-process netlink.

Every tenant gets a named namespace `{prefix}-{domain}` holding `lo` and one veth end
(`eth0`) with exactly the tenant's addresses. The host end of the veth is
`{prefix}{hash}`: plugged into an existing bridge (bridge mode), or given link-local
next-hop addresses and host routes to the tenant's /32 and /128 (routed mode).

Security: runs as root in the supervisor. It reads no tenant-written data: everything
comes from the validated configuration. It only ever deletes namespaces and links whose
names carry the configured prefix, so teardown never touches what nsmail did not make.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from nsmail.config import NetworkConfig, Tenant

NETNS_DIR = Path("/run/netns")
TENANT_IFNAME = "eth0"
IFA_F_NODAD = 0x02  # RFC 4862 DAD would make the address unusable for 1-2 s
RT_SCOPE_LINK = 253
# Routed mode: the host end of every veth answers as this next hop, like a router's
# link-local gateway, so tenants need no address from the host's own subnets.
ROUTED_NEXT_HOP4 = "169.254.0.1"
ROUTED_NEXT_HOP6 = "fe80::1"


@dataclass(frozen=True, slots=True)
class TenantNames:
    """Kernel object names nsmail uses for one tenant."""

    namespace: str
    host_ifname: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.namespace


def names_for(prefix: str, domain: str) -> TenantNames:
    # Interface names are limited to 15 bytes, domains are not: hash them.
    digest = hashlib.blake2s(domain.encode(), digest_size=5).hexdigest()
    return TenantNames(namespace=f"{prefix}-{domain}", host_ifname=f"{prefix}{digest}")


def _is_ours(prefix: str, name: str) -> bool:
    return re.fullmatch(re.escape(prefix) + r"[0-9a-f]{10}", name) is not None


@contextmanager
def _inside(name: str, *, create: bool) -> Iterator[None]:
    """Move this (single-threaded) process into namespace `name` for the block."""
    netns.pushns()
    try:
        flags = os.O_CREAT | os.O_EXCL if create else 0
        netns.setns(name, flags=flags, fork=False)
        yield
    finally:
        netns.popns()


def open_netlink(name: str) -> IPRoute:
    """A netlink socket bound inside namespace `name` (cheaper than pyroute2's forking helper)."""
    with _inside(name, create=False):
        return IPRoute()


class HostNetwork:
    """The host side of tenant networking, held open by the supervisor."""

    def __init__(self, network: NetworkConfig) -> None:
        self.network = network
        self.ipr = IPRoute()
        self._bridge_index: int | None = None
        if network.mode == "routed":
            _enable_forwarding()

    def close(self) -> None:
        self.ipr.close()

    def names(self, tenant: Tenant) -> TenantNames:
        return names_for(self.network.prefix, tenant.domain)

    def create(self, tenant: Tenant) -> TenantNames:
        """Build the tenant's namespace and wire it; on any failure nothing is left."""
        names = self.names(tenant)
        try:
            with _inside(names.namespace, create=True):
                inner = IPRoute()
            with inner:
                self._add_veth(names)
                _configure_inside(inner, tenant, self.network)
            self._configure_host_end(names, tenant)
        except BaseException:
            self.remove(names)
            raise
        return names

    def remove(self, names: TenantNames) -> None:
        """Remove the tenant's link and namespace; missing pieces are not an error."""
        with suppress(NetlinkError):
            self.ipr.link("del", ifname=names.host_ifname)
        _remove_namespace(names.namespace)

    def remove_stale(self, keep: frozenset[str] = frozenset()) -> list[str]:
        """Remove namespaces and links with our prefix left by an earlier run."""
        removed = []
        prefix = self.network.prefix
        for link in self.ipr.get_links():
            ifname = link.get("ifname")
            if _is_ours(prefix, ifname) and ifname not in keep:
                with suppress(NetlinkError):
                    self.ipr.link("del", index=link["index"])
                removed.append(ifname)
        for name in netns.listnetns():
            if name.startswith(prefix + "-") and name not in keep:
                _remove_namespace(name)
                removed.append(name)
        return removed

    def _bridge(self) -> int:
        if self._bridge_index is None:
            bridge = self.network.bridge
            found = self.ipr.link_lookup(ifname=bridge)
            if not found:
                raise OSError(errno.ENODEV, f"bridge {bridge!r} does not exist")
            self._bridge_index = int(found[0])
        return self._bridge_index

    def _add_veth(self, names: TenantNames) -> None:
        fd = os.open(names.path, os.O_RDONLY)
        try:
            self.ipr.link(
                "add",
                ifname=names.host_ifname,
                kind="veth",
                peer={"ifname": TENANT_IFNAME, "net_ns_fd": fd},
            )
        finally:
            os.close(fd)

    def _configure_host_end(self, names: TenantNames, tenant: Tenant) -> None:
        index = int(self.ipr.link_lookup(ifname=names.host_ifname)[0])
        if self.network.mode == "bridge":
            self.ipr.link("set", index=index, master=self._bridge(), state="up")
            return
        self.ipr.link("set", index=index, state="up")
        self.ipr.addr(
            "add", index=index, address=ROUTED_NEXT_HOP4, prefixlen=32, scope=RT_SCOPE_LINK
        )
        self.ipr.addr("add", index=index, address=ROUTED_NEXT_HOP6, prefixlen=64, flags=IFA_F_NODAD)
        if tenant.ipv4 is not None:
            self.ipr.route("add", dst=f"{tenant.ipv4}/32", oif=index, scope=RT_SCOPE_LINK)
        if tenant.ipv6 is not None:
            self.ipr.route("add", dst=f"{tenant.ipv6}/128", oif=index)


def _configure_inside(inner: IPRoute, tenant: Tenant, network: NetworkConfig) -> None:
    lo = int(inner.link_lookup(ifname="lo")[0])
    eth = int(inner.link_lookup(ifname=TENANT_IFNAME)[0])
    inner.link("set", index=lo, state="up")
    inner.link("set", index=eth, state="up")
    if network.mode == "bridge":
        hop4 = str(network.gateway4) if network.gateway4 else None
        hop6 = str(network.gateway6) if network.gateway6 else None
    else:
        hop4, hop6 = ROUTED_NEXT_HOP4, ROUTED_NEXT_HOP6
    if tenant.ipv4 is not None and hop4 is not None:
        inner.addr("add", index=eth, address=str(tenant.ipv4), prefixlen=32)
        # The gateway is outside the tenant's /32: reach it on-link first.
        inner.route("add", dst=f"{hop4}/32", oif=eth, scope=RT_SCOPE_LINK)
        inner.route("add", dst="0.0.0.0/0", gateway=hop4, oif=eth)
    if tenant.ipv6 is not None and hop6 is not None:
        inner.addr("add", index=eth, address=str(tenant.ipv6), prefixlen=128, flags=IFA_F_NODAD)
        if not hop6.startswith("fe80:"):
            inner.route("add", dst=f"{hop6}/128", oif=eth)
        inner.route("add", dst="::/0", gateway=hop6, oif=eth)


def _remove_namespace(name: str) -> None:
    with suppress(FileNotFoundError):
        netns.remove(name)


def _enable_forwarding() -> None:
    # /proc/sys/net is per namespace: this is the namespace the supervisor runs in.
    for knob in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        Path("/proc/sys", knob).write_text("1\n")
