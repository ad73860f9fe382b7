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

import ctypes
import errno
import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nsmail.config import NetworkConfig, Tenant

NETNS_DIR = Path("/run/netns")
TENANT_IFNAME = "eth0"
LOOPBACK_INDEX = 1  # the kernel gives every namespace's lo index 1
TENANT_IFINDEX = 2  # asked for when the veth is made, so it need not be looked up
IFA_F_NODAD = 0x02  # RFC 4862 DAD would make the address unusable for 1-2 s
RT_SCOPE_LINK = 253
# IPv6 link-local addresses bring DAD, router solicitation and multicast listener
# chatter that a bridge floods to every tenant: that made bringing up N tenants cost
# O(N^2). Neither end of a tenant's veth needs one (the host end in routed mode gets
# fe80::1 explicitly).
IN6_ADDR_GEN_MODE_NONE = 1
NO_LINK_LOCAL: dict[str, Any] = {
    "IFLA_AF_SPEC": {
        "attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]
    }
}
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


# Plain system calls through libc, loaded at import time: a forked worker then loads
# (and copies) nothing to enter its namespace.
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 0x100000
MNT_DETACH = 2
OWN_NAMESPACE = "/proc/thread-self/ns/net"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(fd: int, what: object) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), f"setns {what}")


def enter(path: Path) -> None:
    """Move the calling (single-threaded) process into the namespace at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, path)
    finally:
        os.close(fd)


@contextmanager
def _coming_back() -> Iterator[None]:
    home = os.open(OWN_NAMESPACE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield
    finally:
        _setns(home, "back")
        os.close(home)


@contextmanager
def inside(path: Path) -> Iterator[None]:
    """Run the block in the namespace at `path`, then come back."""
    with _coming_back():
        enter(path)
        yield


def share_netns_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does.

    Namespaces are kept alive by bind mounts there; shared propagation makes them
    visible in every mount namespace (`ip netns exec`, systemd's private mounts).
    """
    NETNS_DIR.mkdir(mode=0o755, exist_ok=True)
    where = bytes(NETNS_DIR)
    if _libc.mount(b"none", where, None, MS_SHARED | MS_REC, None) != 0:
        _check(_libc.mount(where, where, None, MS_BIND | MS_REC, None), f"mount {where!r}")
        _check(_libc.mount(b"none", where, None, MS_SHARED | MS_REC, None), "share /run/netns")


def create_namespace(path: Path) -> IPRoute:
    """Create a named namespace like `ip netns add`; return a netlink socket inside it."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    with _coming_back():
        _check(_libc.unshare(CLONE_NEWNET), "unshare")
        _ignore_router_advertisements()
        _check(
            _libc.mount(OWN_NAMESPACE.encode(), bytes(path), None, MS_BIND, None), f"mount {path}"
        )
        return IPRoute()


def _ignore_router_advertisements() -> None:
    # In the caller's new namespace: a stray RA on the bridge must not give a tenant a
    # second address or a route nsmail did not make.
    Path("/proc/sys/net/ipv6/conf/default/accept_ra").write_text("0")


def remove_namespace(path: Path) -> None:
    _libc.umount2(bytes(path), MNT_DETACH)  # fails harmlessly if it is no mount (any more)
    with suppress(FileNotFoundError):
        path.unlink()


def names_for(prefix: str, domain: str) -> TenantNames:
    # Interface names are limited to 15 bytes, domains are not: hash them.
    digest = hashlib.blake2s(domain.encode(), digest_size=5).hexdigest()
    return TenantNames(namespace=f"{prefix}-{domain}", host_ifname=f"{prefix}{digest}")


def _is_ours(prefix: str, name: str) -> bool:
    return re.fullmatch(re.escape(prefix) + r"[0-9a-f]{10}", name) is not None


class HostNetwork:
    """The host side of tenant networking, held open by the supervisor."""

    def __init__(self, network: NetworkConfig) -> None:
        self.network = network
        share_netns_dir()
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
            inner = create_namespace(names.path)
            with inner:
                self._add_veth(names)
                self._configure_host_end(names, tenant)
                _configure_inside(inner, tenant, self.network)
        except BaseException:
            self.remove(names)
            raise
        return names

    def remove(self, names: TenantNames) -> None:
        """Remove the tenant's namespace; missing pieces are not an error.

        Deleting a veth explicitly waits for several RCU grace periods (about 40 ms);
        once the namespace's last user is gone the kernel destroys its devices, the veth
        pair with them, in batches in the background.
        """
        remove_namespace(names.path)

    def ours(self) -> list[str]:
        """Host-side links and namespaces that carry this configuration's prefix."""
        prefix = self.network.prefix
        links = [link.get("ifname") for link in self.ipr.get_links()]
        return [n for n in links if _is_ours(prefix, n)] + [
            n for n in _listdir(NETNS_DIR) if n.startswith(prefix + "-")
        ]

    def remove_stale(self) -> list[str]:
        """Remove every namespace and link with our prefix, e.g. left by a crashed run."""
        stale = self.ours()
        for name in stale:
            if "-" in name:
                remove_namespace(NETNS_DIR / name)
            else:
                with suppress(NetlinkError):
                    self.ipr.link("del", ifname=name)
        return stale

    def wait_all_gone(self, timeout: float) -> list[str]:
        """Wait for the kernel to finish destroying removed namespaces; return leftovers."""
        deadline = time.monotonic() + timeout
        while (left := self.ours()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

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
            try:
                self._link_veth(names, fd)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
                # The same tenant's previous namespace is still being destroyed.
                with suppress(NetlinkError):
                    self.ipr.link("del", ifname=names.host_ifname)
                self._link_veth(names, fd)
        finally:
            os.close(fd)

    def _link_veth(self, names: TenantNames, ns_fd: int) -> None:
        peer = {"ifname": TENANT_IFNAME, "index": TENANT_IFINDEX, "net_ns_fd": ns_fd}
        self.ipr.link("add", ifname=names.host_ifname, kind="veth", peer=peer)

    def _configure_host_end(self, names: TenantNames, tenant: Tenant) -> None:
        if self.network.mode == "bridge":
            self.ipr.link(
                "set", ifname=names.host_ifname, master=self._bridge(), state="up", **NO_LINK_LOCAL
            )
            return
        index = _index(self.ipr, names.host_ifname)
        self.ipr.link("set", index=index, state="up", **NO_LINK_LOCAL)
        self.ipr.addr(
            "add", index=index, address=ROUTED_NEXT_HOP4, prefixlen=32, scope=RT_SCOPE_LINK
        )
        self.ipr.addr("add", index=index, address=ROUTED_NEXT_HOP6, prefixlen=64, flags=IFA_F_NODAD)
        if tenant.ipv4 is not None:
            self.ipr.route("add", dst=f"{tenant.ipv4}/32", oif=index, scope=RT_SCOPE_LINK)
        if tenant.ipv6 is not None:
            self.ipr.route("add", dst=f"{tenant.ipv6}/128", oif=index)


def _index(ipr: IPRoute, ifname: str) -> int:
    # One RTM_GETLINK by name; link_lookup() would dump every link of the namespace,
    # which makes bringing up N tenants cost O(N^2).
    return int(ipr.link("get", ifname=ifname)[0]["index"])


def _configure_inside(inner: IPRoute, tenant: Tenant, network: NetworkConfig) -> None:
    eth = TENANT_IFINDEX
    inner.link("set", index=LOOPBACK_INDEX, state="up")
    inner.link("set", index=eth, state="up", **NO_LINK_LOCAL)
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


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _enable_forwarding() -> None:
    # /proc/sys/net is per namespace: this is the namespace the supervisor runs in.
    for knob in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        Path("/proc/sys", knob).write_text("1\n")
