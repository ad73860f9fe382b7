"""The one lab network of `nsmail demo` and the tests: a hosting machine and "the internet".

Layout (every name starts with the lab's prefix: ``demo`` for the demo, a random one such
as ``t3f9a`` for each test lab)::

    {prefix}host                                {prefix}net
      nsbr0 198.51.100.1/24 (optional bridge)     eth0 203.0.113.25/24   (MX)
            2001:db8:51::1/64  fe80::1/64               203.0.113.53/24   (DNS)
      up0   203.0.113.1/24  <---- veth ---->            2001:db8:113::25/64
            2001:db8:113::1/64 fe80::1/64               2001:db8:113::53/64
      (forwarding on)                                   fe80::2/64
                                                  routes 198.51.100.0/24, 2001:db8:51::/64
                                                  via the host side of the veth

The host namespace has no default route: it reaches only 203.0.113.0/24 and
2001:db8:113::/64, which is all the lab's "internet" holds. Tenants plug into the bridge
(the supervisor under test names their namespaces ``{prefix}-<domain>``); the internet
routes their subnets back through the hosting machine. No link has a generated IPv6
link-local address (they bring DAD delays and chatter), but the veth ends and the bridge
have fixed ones: the kernel sends a neighbour solicitation for a forwarded packet only
from a link-local address.

A lab owns its two namespaces and every namespace named ``{prefix}-...``; a prefix drawn
at random so that no namespace began with it (``exclusive``) owns every name it begins,
so the tests' extra namespaces go with their lab. An `Inventory` says what one run made
(its prefix, its owner, its directory, the processes to stop gently) and is saved before
the things it names exist, so that `take_down`, which is safe to repeat, removes what a
killed run left.

Security: runs as root and creates and deletes kernel objects. It deletes only namespaces
that the prefix owns, kills only processes inside them or recorded by pid and start time
(pids get reused), and puts only documentation addresses (198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32; never 192.0.2.0/24 or fd00::/64, this machine's real uplink) into its own
namespaces, never into the machine's. Inventories are root's own files.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from nsmail.lab.dnsserver import Record, forward_and_reverse
from nsmail.root import netns, rtnetlink, setns

NETNS_DIR = netns.NETNS_DIR
# `ip netns exec` reads a namespace's own resolv.conf and friends from here.
ETC_NETNS_DIR = Path("/etc/netns")

HOST_NAME = "abc.test"
HOST_V4, HOST_V6 = "203.0.113.1", "2001:db8:113::1"
MX_NAME = "mx.test"
MX_V4, MX_V6 = "203.0.113.25", "2001:db8:113::25"
DNS_V4, DNS_V6 = "203.0.113.53", "2001:db8:113::53"
BRIDGE, BRIDGE_V4, BRIDGE_V6 = "nsbr0", "198.51.100.1", "2001:db8:51::1"
# The bridge's subnets: every tenant address is in them.
TENANT_SUBNET4, TENANT_SUBNET6 = "198.51.100.0/24", "2001:db8:51::/64"
RECIPIENT_DOMAIN = "rcpt.test"  # mail for it goes to MX_NAME
UPLINK = "up0"  # the hosting machine's end of the veth
PEER = "eth0"  # the internet's end
LINK_LOCAL_HOST, LINK_LOCAL_NET = "fe80::1", "fe80::2"

UPLINK_ADDRESSES = ((HOST_V4, 24), (HOST_V6, 64), (LINK_LOCAL_HOST, 64))
BRIDGE_ADDRESSES = ((BRIDGE_V4, 24), (BRIDGE_V6, 64), (LINK_LOCAL_HOST, 64))
PEER_ADDRESSES = ((MX_V4, 24), (DNS_V4, 24), (MX_V6, 64), (DNS_V6, 64), (LINK_LOCAL_NET, 64))
PEER_ROUTES = ((TENANT_SUBNET4, HOST_V4), (TENANT_SUBNET6, HOST_V6))

STOP_GRACE = 2.0  # seconds a recorded process gets after SIGTERM, unless told otherwise
KILL_WAIT = 5.0  # seconds to wait for SIGKILLed processes to be gone


@dataclass(frozen=True, slots=True)
class Names:
    """The names of one lab's namespaces, and which namespaces it owns."""

    prefix: str
    exclusive: bool = False  # drawn so that no namespace began with it: owns all `{prefix}*`

    def __post_init__(self) -> None:
        if not self.prefix:
            raise ValueError("a lab's prefix cannot be empty: it would own other names")

    @property
    def host(self) -> str:
        return f"{self.prefix}host"

    @property
    def net(self) -> str:
        return f"{self.prefix}net"

    def owns(self, namespace: str) -> bool:
        if self.exclusive:
            return namespace.startswith(self.prefix)
        return namespace in (self.host, self.net) or namespace.startswith(self.prefix + "-")


def lab_records() -> list[Record]:
    """The DNS of the lab's own machines: forward and reverse for the hosting machine (its
    bridge's address too) and the MX, and the recipient domain's MX."""
    records = [(RECIPIENT_DOMAIN, "MX", f"10 {MX_NAME}"), (BRIDGE_V4, "PTR", HOST_NAME)]
    named = ((HOST_NAME, HOST_V4), (HOST_NAME, HOST_V6), (MX_NAME, MX_V4), (MX_NAME, MX_V6))
    for name, address in named:
        records += forward_and_reverse(name, address)
    return records


# --- processes, known by pid and start time ---------------------------------------------


def start_time(pid: int) -> int | None:
    """The start time of a live (not zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields count from its last ")".
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in "ZX" else int(fields[19])


@dataclass(frozen=True, slots=True)
class Proc:
    """A process a lab run started or belongs to, known by pid and start time."""

    role: str
    pid: int
    start: int

    @classmethod
    def of(cls, role: str, pid: int) -> Proc:
        return cls(role, pid, start_time(pid) or 0)

    def alive(self, child: subprocess.Popen[bytes] | None = None) -> bool:
        """Whether it still runs; `child` is its Popen if it is the caller's own child."""
        if self.pid <= 0:
            return False
        if child is not None and child.poll() is not None:  # reaped just now
            return False
        return start_time(self.pid) == self.start


# --- the record of what exists ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything one lab run made; saved before each thing it names exists."""

    names: Names
    owner: Proc
    tmp: str | None = None
    kept: bool = False  # left up on purpose: its owner's end does not make it a leftover
    processes: tuple[Proc, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Inventory:
        try:
            data = json.loads(text)
            return cls(
                names=Names(**data.pop("names")),
                owner=Proc(**data.pop("owner")),
                processes=tuple(Proc(**p) for p in data.pop("processes")),
                **data,
            )
        except (TypeError, KeyError, AttributeError) as e:  # well-formed JSON of another shape
            raise ValueError(f"not an inventory: {e}") from None


def save(inventory: Inventory, path: Path) -> None:
    """Write `inventory` to `path` in one rename, so a reader never sees half of it."""
    part = path.with_name(path.name + ".part")
    part.write_text(inventory.to_json())
    part.replace(path)


def load(path: Path) -> Inventory | None:
    """The inventory at `path`, None if there is none; ValueError if it is damaged."""
    try:
        return Inventory.from_json(path.read_text())
    except FileNotFoundError:
        return None


def sweep(paths: Iterable[Path]) -> list[str]:
    """Take down the labs inventoried at `paths` whose owners died and did not keep them;
    their prefixes. A prefix that a live owner's lab uses keeps its namespaces."""
    dead: list[tuple[Path, Inventory]] = []
    alive: set[str] = set()
    for path in paths:
        try:
            inventory = load(path)
        except (OSError, ValueError):
            continue  # not a lab's
        if inventory is None:
            continue
        if inventory.kept or inventory.owner.alive():
            alive.add(inventory.names.prefix)
        else:
            dead.append((path, inventory))
    for path, inventory in dead:
        if inventory.names.prefix not in alive:
            take_down(inventory)
        elif inventory.tmp:
            shutil.rmtree(inventory.tmp, ignore_errors=True)  # its files, not the namespaces
        path.unlink(missing_ok=True)
    return sorted(inventory.names.prefix for _, inventory in dead)


# --- building it ----------------------------------------------------------------------------


class PrefixTaken(Exception):
    """The lab's host namespace exists already: the prefix is another lab's; nothing was made."""


def new_names() -> Names:
    """Names with a random prefix that is not a prefix of any namespace present."""
    while True:
        prefix = "t" + secrets.token_hex(2)
        if not any(name.startswith(prefix) for name in _listdir(NETNS_DIR)):
            return Names(prefix, exclusive=True)


def build(names: Names, *, bridge: bool = True) -> None:
    """Make the lab's namespaces and links (see the module docstring).

    The caller saves the inventory first and takes the lab down if this fails half-way.
    """
    netns.share_netns_dir()
    try:
        host = netns.create_namespace(NETNS_DIR / names.host)
    except FileExistsError:
        raise PrefixTaken(names.prefix) from None
    with host, netns.create_namespace(NETNS_DIR / names.net) as net:
        _enable_forwarding(NETNS_DIR / names.host)
        for ipr in (host, net):
            ipr.link("set", index=netns.LOOPBACK_INDEX, state="up")
        fd = os.open(NETNS_DIR / names.net, os.O_RDONLY | os.O_CLOEXEC)
        try:
            host.link("add", ifname=UPLINK, kind="veth", peer={"ifname": PEER, "net_ns_fd": fd})
        finally:
            os.close(fd)
        _addresses(host, UPLINK, UPLINK_ADDRESSES)
        _addresses(net, PEER, PEER_ADDRESSES)
        for destination, gateway in PEER_ROUTES:
            net.route("add", dst=destination, gateway=gateway)
        if bridge:
            host.link("add", ifname=BRIDGE, kind="bridge")
            _addresses(host, BRIDGE, BRIDGE_ADDRESSES)
        _wait_operational(net, PEER)


def _wait_operational(ipr: IPRoute, ifname: str, timeout: float = 5.0) -> None:
    # A new veth's carrier reaches its operational state through the kernel's linkwatch,
    # up to a second later unless someone asks for the link (asking settles it), and
    # until then IPv6 does not use the link: the lab's first connection over IPv6 waited
    # out a SYN retransmission (1 s), which the first benchmark round paid alone.
    deadline = time.monotonic() + timeout
    while ipr.link("get", ifname=ifname)[0].get_attr("IFLA_OPERSTATE") != "UP":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ifname} is not up after {timeout:.0f} s")
        time.sleep(0.01)


def _enable_forwarding(namespace: Path) -> None:
    # /proc/sys/net shows the namespace of the thread that opens it.
    with setns.inside(namespace):
        for knob in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
            Path("/proc/sys", knob).write_text("1\n")


def _addresses(ipr: IPRoute, ifname: str, addresses: Iterable[tuple[str, int]]) -> None:
    index = int(ipr.link("get", ifname=ifname)[0]["index"])
    for address, prefixlen in addresses:
        # No duplicate address detection: nobody else is on these links.
        flags = rtnetlink.IFA_F_NODAD if ":" in address else 0
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=flags)
    ipr.link("set", index=index, state="up", **netns.NO_LINK_LOCAL)


# --- taking it down -------------------------------------------------------------------------


def owned(names: Names) -> list[str]:
    """The namespaces present that `names` owns."""
    return sorted(name for name in _listdir(NETNS_DIR) if names.owns(name))


def take_down(
    inventory: Inventory,
    children: Mapping[int, subprocess.Popen[bytes]] | None = None,
    graces: Mapping[str, float] | None = None,
) -> list[str]:
    """Remove everything `inventory` names; what could not be removed. Safe to repeat.

    Recorded processes are stopped newest first, each given `graces[role]` seconds (else
    STOP_GRACE) after SIGTERM; then whatever runs in the owned namespaces is killed and
    they are deleted. `children` are the recorded processes that are the caller's own.
    """
    children = children or {}
    graces = graces or {}
    for proc in reversed(inventory.processes):
        _stop(proc, graces.get(proc.role, STOP_GRACE), children.get(proc.pid))
    namespaces = owned(inventory.names)
    _kill_inside([NETNS_DIR / name for name in namespaces])
    errors = []
    for name in namespaces:
        try:
            netns.remove_namespace(NETNS_DIR / name)
        except OSError as e:
            errors.append(f"removing namespace {name}: {e}")
    for name in _listdir(ETC_NETNS_DIR):
        if inventory.names.owns(name):
            shutil.rmtree(ETC_NETNS_DIR / name, ignore_errors=True)
    if inventory.tmp:
        shutil.rmtree(inventory.tmp, ignore_errors=True)
    return errors


def _stop(proc: Proc, grace: float, child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, and wait until it is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        if not proc.alive(child):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + wait
        while proc.alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)


def _kill_inside(namespaces: list[Path]) -> None:
    """SIGKILL every process whose network namespace is one of `namespaces`."""
    inodes = set()
    for path in namespaces:
        with contextlib.suppress(OSError):
            st = path.stat()
            inodes.add((st.st_dev, st.st_ino))
    deadline = time.monotonic() + KILL_WAIT
    while inodes and time.monotonic() < deadline:
        found = False
        for entry in _listdir(Path("/proc")):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
                pid = int(entry)
                if (st.st_dev, st.st_ino) in inodes and pid != os.getpid() and start_time(pid):
                    found = True
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        if not found:
            return
        time.sleep(0.02)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
