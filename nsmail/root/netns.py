"""Tenant network namespaces: create, wire and remove them with in-process netlink.

Every tenant gets a named namespace `{prefix}-{domain}` holding `lo` and one veth end
(`eth0`) with exactly the tenant's addresses. The host end of the veth is
`{prefix}{hash}`: plugged into an existing bridge (bridge mode), or given link-local
next-hop addresses and host routes to the tenant's /32 and /128 (routed mode). A
tenant's addresses are in nsmail's firewall table (`nsmail.core.firewall`) before its
namespace exists, so nothing in it ever reaches the host's own services.

Security: runs as root in the supervisor. It reads no tenant-written data: everything
comes from the validated configuration. It only ever deletes namespaces and links whose
names carry the configured prefix, and the nftables table `inet nsmail`, so teardown
never touches what nsmail did not make.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nsmail.core import firewall
from nsmail.core.config import IPAddress, NetworkConfig, Tenant
from nsmail.root import nft, rtnetlink
from nsmail.root.setns import CLONE_NEWNET, OWN_NAMESPACE, check, coming_back, libc, setns

log = logging.getLogger("nsmail.root.netns")

NETNS_DIR = Path("/run/netns")
TENANT_IFNAME = "eth0"
LOOPBACK_INDEX = 1  # the kernel gives every namespace's lo index 1
TENANT_IFINDEX = 2  # asked for when the veth is made, so it need not be looked up
# IPv6 link-local addresses bring DAD, router solicitation and multicast listener
# chatter that a bridge floods to every tenant: that made bringing up N tenants cost
# O(N^2). Neither end of a tenant's veth has one (the host end in routed mode gets
# fe80::1 explicitly). The same for pyroute2's `link("set", ...)` (the demo's links):
NO_LINK_LOCAL: dict[str, Any] = {
    "IFLA_AF_SPEC": {
        "attrs": [
            [
                "AF_INET6",
                {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", rtnetlink.IN6_ADDR_GEN_MODE_NONE]]},
            ]
        ]
    }
}
# Routed mode: the host end of every veth answers as this next hop, like a router's
# link-local gateway, so tenants need no address from the host's own subnets.
ROUTED_NEXT_HOP4 = IPv4Address("169.254.0.1")
ROUTED_NEXT_HOP6 = IPv6Address("fe80::1")
# Policy rules that keep the host's own processes from sending as a tenant
# (rtnetlink.local_source_rule): before the main table (32766), after local (0).
SOURCE_RULE_PRIORITY = 1000
ANY4 = IPv4Address("0.0.0.0")
ANY6 = IPv6Address("::")


@dataclass(frozen=True, slots=True)
class TenantNames:
    """Kernel object names nsmail uses for one tenant."""

    namespace: str
    host_ifname: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.namespace


MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 0x100000
MNT_DETACH = 2


def share_netns_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does.

    Namespaces are kept alive by bind mounts there; shared propagation makes them
    visible in every mount namespace (`ip netns exec`, systemd's private mounts).
    """
    NETNS_DIR.mkdir(mode=0o755, exist_ok=True)
    where = bytes(NETNS_DIR)
    if libc.mount(b"none", where, None, MS_SHARED | MS_REC, None) != 0:
        check(libc.mount(where, where, None, MS_BIND | MS_REC, None), f"mount {where!r}")
        check(libc.mount(b"none", where, None, MS_SHARED | MS_REC, None), "share /run/netns")


@contextmanager
def _new_namespace(path: Path) -> Iterator[None]:
    """Create a named namespace like `ip netns add`; run the block inside it."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    with coming_back():
        check(libc.unshare(CLONE_NEWNET), "unshare")
        _set_link_defaults()
        check(libc.mount(OWN_NAMESPACE.encode(), bytes(path), None, MS_BIND, None), f"mount {path}")
        yield


def create_namespace(path: Path) -> IPRoute:
    """Create a named namespace like `ip netns add`; return a netlink socket inside it."""
    with _new_namespace(path):
        return IPRoute()


def _set_link_defaults() -> None:
    # In the caller's new namespace, for the veth end about to be made in it. A stray RA
    # on the bridge must not give a tenant a second address or a route nsmail did not
    # make. No link-local address: IFLA_AF_SPEC cannot set that at creation, and
    # `link set up` applies it only after the link came up with one (and its DAD).
    for knob, value in (("accept_ra", b"0"), ("addr_gen_mode", b"1")):
        fd = os.open(f"/proc/sys/net/ipv6/conf/default/{knob}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)


def remove_namespace(path: Path) -> None:
    libc.umount2(bytes(path), MNT_DETACH)  # fails harmlessly if it is no mount (any more)
    with suppress(FileNotFoundError):
        path.unlink()


def names_for(prefix: str, domain: str) -> TenantNames:
    # Interface names are limited to 15 bytes, domains are not: hash them.
    digest = hashlib.blake2s(domain.encode(), digest_size=5).hexdigest()
    return TenantNames(namespace=f"{prefix}-{domain}", host_ifname=f"{prefix}{digest}")


def _is_ours(prefix: str, name: str) -> bool:
    return re.fullmatch(re.escape(prefix) + r"[0-9a-f]{10}", name) is not None


class HostNetwork:
    """The host side of tenant networking, held open by the supervisor.

    It acts on the namespace it was made in, whichever namespace the calling thread is
    in later: its netlink sockets were opened there, and nft runs there.

    The firewall's sets gain a tenant's addresses in `create`, before anything of the
    tenant exists; if nft is missing or fails, `create` fails and the tenant's worker
    never starts. They lose the addresses of removed tenants with the next `create`, in
    the same transaction, and the table goes in `close`: removing set members makes the
    kernel wait for an RCU grace period, 10-20 ms per transaction, which would add 10 s
    or more to stopping 1000 tenants one by one. Meanwhile an address in the sets only
    blocks, and no tenant of ours uses it (a process left in a removed namespace, such as
    an `nsmail exec`, stays blocked).
    """

    def __init__(self, network: NetworkConfig) -> None:
        self.network = network
        share_netns_dir()
        self.ipr = IPRoute()  # for the rare lookups: listing and removing links
        self.rtnl = rtnetlink.open_socket()  # for building tenants, in batches
        self._home = os.open(OWN_NAMESPACE, os.O_RDONLY | os.O_CLOEXEC)  # where nft runs
        self._bridge_index: int | None = None
        self._guarded: dict[Path, tuple[IPAddress, ...]] = {}  # namespace -> its addresses
        # What the firewall's sets hold; None when unknown (not made by us, or a change
        # failed): the next change then replaces the whole table.
        self._blocked: frozenset[IPAddress] | None = None
        self._table_made = False  # whether our table may be in the kernel, for `close`
        self._exempt: frozenset[int] | None = None  # restrict_smtp's exempt uids; None: off
        if network.mode == "routed":
            _enable_forwarding()

    def close(self) -> None:
        if self._table_made:
            self._remove_firewall("cannot remove the firewall table")
        os.close(self._home)
        self.ipr.close()
        self.rtnl.close()

    def names(self, tenant: Tenant) -> TenantNames:
        return names_for(self.network.prefix, tenant.domain)

    def create(self, tenant: Tenant) -> TenantNames:
        """Build the tenant's namespace and wire it; on any failure nothing is left."""
        names = self.names(tenant)
        self._guarded[names.path] = tenant.addresses
        try:
            self._block_guarded()
            with _new_namespace(names.path):
                inner = rtnetlink.open_socket()
            with inner:
                self._add_veth(names)
                guards = [
                    rtnetlink.local_source_rule(a, SOURCE_RULE_PRIORITY) for a in tenant.addresses
                ]
                rtnetlink.execute(self.rtnl, self._host_end(names, tenant) + guards)
                rtnetlink.execute(inner, _inside(tenant, self.network))
        except BaseException:
            self.remove(names)
            raise
        return names

    def restrict_smtp(self, exempt: frozenset[int] | None) -> None:
        """Keep every uid but `exempt` off remote SMTP ports (None: let them), by
        replacing the whole table at once; NftError if nft fails (nothing changed)."""
        if exempt == self._exempt and (self._table_made or exempt is None):
            return
        self._exempt = exempt
        self._blocked = None
        self._block_guarded()

    def remove(self, names: TenantNames) -> None:
        """Remove the tenant's namespace; missing pieces are not an error.

        Its addresses stay in the firewall's sets until the next `create` (see the class).

        Deleting a veth explicitly waits for several RCU grace periods (about 40 ms);
        once the namespace's last user is gone the kernel destroys its devices, the veth
        pair with them, in batches in the background.
        """
        remove_namespace(names.path)
        for address in self._guarded.pop(names.path, ()):
            unguard = rtnetlink.local_source_rule(address, SOURCE_RULE_PRIORITY, add=False)
            with suppress(FileNotFoundError):
                rtnetlink.execute(self.rtnl, [unguard])

    def ours(self) -> list[str]:
        """Host-side links and namespaces that carry this configuration's prefix."""
        prefix = self.network.prefix
        # get_attr, not get("ifname"): Debian's pyroute2 (0.7) knows no short names.
        links = [link.get_attr("IFLA_IFNAME") for link in self.ipr.get_links()]
        return [n for n in links if _is_ours(prefix, n)] + [
            n for n in _listdir(NETNS_DIR) if n.startswith(prefix + "-")
        ]

    def remove_stale(self) -> list[str]:
        """Remove every namespace, link and source rule of ours, and the firewall table,
        e.g. left by a crashed run."""
        self._remove_firewall("cannot remove the firewall table left by an earlier run")
        for address in self._source_rules():
            unguard = rtnetlink.local_source_rule(address, SOURCE_RULE_PRIORITY, add=False)
            with suppress(FileNotFoundError):
                rtnetlink.execute(self.rtnl, [unguard])
        stale = self.ours()
        for name in stale:
            if "-" in name:
                remove_namespace(NETNS_DIR / name)
            else:
                with suppress(NetlinkError):
                    self.ipr.link("del", ifname=name)
        return stale

    def _source_rules(self) -> list[IPAddress]:
        found: list[IPAddress] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in self.ipr.get_rules(family=family):
                source = rule.get_attr("FRA_SRC")
                if rule.get_attr("FRA_PRIORITY") == SOURCE_RULE_PRIORITY and source:
                    found.append(ip_address(source))
        return found

    def _block_guarded(self) -> None:
        """Make the firewall's sets hold exactly the guarded addresses, in one transaction."""
        wanted = frozenset(a for addresses in self._guarded.values() for a in addresses)
        if self._blocked is not None:
            try:
                if change := firewall.changes(self._blocked, wanted):
                    self._nft(change)
            except nft.NftError:
                pass  # the table is not as we made it (`nft flush ruleset`, say): remake it
            else:
                self._blocked = wanted
                return
        self._blocked = None  # until nft has applied it
        self._table_made = True
        self._nft(firewall.table(wanted, self._exempt))
        self._blocked = wanted

    def _remove_firewall(self, failure: str) -> None:
        # A table left behind only blocks; the next start removes it, or `create`
        # replaces it whole (and says why if it cannot).
        self._blocked = None
        self._table_made = False
        try:
            self._nft(firewall.deletion())
        except nft.NftError as e:
            log.warning("%s: %s", failure, e)

    def _nft(self, text: str) -> None:
        with coming_back():
            setns(self._home, "the host namespace")
            nft.apply(text)

    def wait_all_gone(self, timeout: float) -> list[str]:
        """Wait for the kernel to finish destroying removed namespaces; return leftovers."""
        deadline = time.monotonic() + timeout
        while (left := self.ours()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def _bridge(self) -> int:
        if self._bridge_index is None:
            bridge = self.network.bridge
            assert bridge is not None  # the configuration requires it in bridge mode
            try:
                self._bridge_index = _index(self.ipr, bridge)
            except NetlinkError:
                raise OSError(errno.ENODEV, f"bridge {bridge!r} does not exist") from None
        return self._bridge_index

    def _add_veth(self, names: TenantNames) -> None:
        fd = os.open(names.path, os.O_RDONLY)
        try:
            veth = rtnetlink.veth(names.host_ifname, TENANT_IFNAME, TENANT_IFINDEX, fd)
            try:
                rtnetlink.execute(self.rtnl, [veth])
            except FileExistsError:
                # The same tenant's previous namespace is still being destroyed.
                with suppress(NetlinkError):
                    self.ipr.link("del", ifname=names.host_ifname)
                rtnetlink.execute(self.rtnl, [veth])
        finally:
            os.close(fd)

    def _host_end(self, names: TenantNames, tenant: Tenant) -> list[rtnetlink.Request]:
        ifname = names.host_ifname
        if self.network.mode == "bridge":
            # Isolated: tenants reach only the bridge and its uplinks, never each other,
            # and the multicast one tenant sends (MLD reports) is not flooded to every
            # other one, which made bringing up N tenants cost O(N^2).
            return [
                rtnetlink.link_up(ifname=ifname, master=self._bridge()),
                rtnetlink.isolated_bridge_port(ifname),
            ]
        index = _index(self.ipr, ifname)
        requests = [
            rtnetlink.link_up(index),  # before the tenant's end: no carrier, no link-local
            rtnetlink.address(index, ROUTED_NEXT_HOP4, 32, scope=rtnetlink.RT_SCOPE_LINK),
            rtnetlink.address(index, ROUTED_NEXT_HOP6, 64),
        ]
        if tenant.ipv4 is not None:
            requests.append(rtnetlink.route(tenant.ipv4, 32, index))
        if tenant.ipv6 is not None:
            requests.append(rtnetlink.route(tenant.ipv6, 128, index))
        return requests


def _index(ipr: IPRoute, ifname: str) -> int:
    # One RTM_GETLINK by name, on the socket of the supervisor's namespace (not the
    # calling thread's); link_lookup() would dump every link, O(N) per tenant.
    return int(ipr.link("get", ifname=ifname)[0]["index"])


def _inside(tenant: Tenant, network: NetworkConfig) -> list[rtnetlink.Request]:
    eth = TENANT_IFINDEX
    requests = [rtnetlink.link_up(LOOPBACK_INDEX), rtnetlink.link_up(eth)]
    hop4: IPv4Address | None = ROUTED_NEXT_HOP4
    hop6: IPv6Address | None = ROUTED_NEXT_HOP6
    if network.mode == "bridge":
        hop4, hop6 = network.gateway4, network.gateway6
    if tenant.ipv4 is not None and hop4 is not None:
        requests += [
            rtnetlink.address(eth, tenant.ipv4, 32),
            # The gateway is outside the tenant's /32: reach it on-link first.
            rtnetlink.route(hop4, 32, eth),
            rtnetlink.route(ANY4, 0, eth, gateway=hop4),
        ]
    if tenant.ipv6 is not None and hop6 is not None:
        requests.append(rtnetlink.address(eth, tenant.ipv6, 128))
        if not hop6.is_link_local:
            requests.append(rtnetlink.route(hop6, 128, eth))
        requests.append(rtnetlink.route(ANY6, 0, eth, gateway=hop6))
    return requests


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _enable_forwarding() -> None:
    # /proc/sys/net is per namespace: this is the namespace the supervisor runs in.
    for knob in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        Path("/proc/sys", knob).write_text("1\n")
