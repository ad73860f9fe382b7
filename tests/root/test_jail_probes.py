"""Escape probes run inside real jailed processes in real tenant namespaces.

Each probe runs in a child made by `nsmail.root.spawn.spawn`, the same call (namespace,
preparation, `nsmail.root.jail.enter`) the supervisor uses for a tenant's worker; only the
code run after the jail differs. Every probe asserts the specific refusal, in both
network modes.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from ipaddress import ip_address
from typing import Any

import prctl
import pytest
from hosting import DUAL, THREE, V4_ONLY, Hosting
from lab import BRIDGE, BRIDGE_V4, HOST_V4, HOST_V6, MX_V4, MX_V6, Lab

from nsmail.core.config import Config, Tenant
from nsmail.host.configfile import load
from nsmail.root.jail import Identity, check_status
from nsmail.root.netns import (
    NETNS_DIR,
    ROUTED_NEXT_HOP4,
    ROUTED_NEXT_HOP6,
    TENANT_IFNAME,
    HostNetwork,
    TenantNames,
)
from nsmail.root.setns import inside
from nsmail.root.spawn import SpawnError, Target, Zygote

REMOTE_PORT = 2525
# Listeners in the host namespace: on `::` (IPv4 too, as mapped addresses) and `0.0.0.0`.
HOST_PORT_ANY = 2626
HOST_PORT_ANY4 = 2727
Probe = Callable[..., Any]


@dataclass
class Jails:
    lab: Lab
    config: Config
    names: dict[str, TenantNames]
    zygote: Zygote

    def tenant(self, domain: str) -> Tenant:
        tenant = self.config.tenant(domain)
        assert tenant is not None
        return tenant

    def identity(self, domain: str) -> Identity:
        tenant = self.tenant(domain)
        return Identity(tenant.uid, tenant.gid, tenant.home)

    def run(self, domain: str, probe: Probe, *args: Any, keep: tuple[int, ...] = ()) -> Any:
        """Run `probe(fds, *args)` jailed as `domain`'s worker would be; return its report."""
        mine, theirs = socket.socketpair()
        pid = self.spawn(
            "probe", domain, [theirs.fileno(), *keep], partial(_probe_target, probe, args)
        )
        theirs.close()
        with mine:
            mine.settimeout(30)
            data = b"".join(iter(lambda: mine.recv(65536), b""))
        status = wait_adopted(pid)
        assert os.waitstatus_to_exitcode(status) == 0, f"probe died: {status}"
        return json.loads(data)

    def start_sleeper(self, domain: str) -> int:
        return self.spawn("sleeper", domain, [], _sleeper_target)

    def spawn(
        self,
        title: str,
        domain: str,
        fds: list[int],
        target: Target,
        identity: Identity | None = None,
    ) -> int:
        """Start a jailed child the way the supervisor does, and wait for its pid."""
        results: list[int | SpawnError] = []
        identity = identity or self.identity(domain)
        self.zygote.request(title, identity, self.names[domain].path, fds, target, results.append)
        self.zygote.collect(block=True)
        (pid,) = results
        assert isinstance(pid, int), pid
        return pid


def wait_adopted(pid: int) -> int:
    """waitpid() for a child of the zygote, which becomes ours once its intermediate exits."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _probe_target(probe: Probe, args: tuple[Any, ...], fds: list[int]) -> Callable[[], None]:
    report = socket.socket(fileno=fds[0])
    return lambda: report.sendall(json.dumps(probe(fds, *args)).encode())


def _sleeper_target(fds: list[int]) -> Callable[[], None]:
    return lambda: time.sleep(60)


@pytest.fixture(scope="module", params=["bridge", "routed"])
def jails(request: pytest.FixtureRequest) -> Iterator[Jails]:
    mode = request.param
    with Lab(bridge=mode == "bridge") as lab:
        hosting = Hosting(lab, mode=mode)
        config = load(hosting.write_config(THREE))
        with inside(NETNS_DIR / lab.host):
            host = HostNetwork(config.network)
        lab.defer(host.close)
        names = {}
        for tenant in config.tenants:
            names[tenant.domain] = host.create(tenant)
            lab.defer(lambda n=names[tenant.domain]: host.remove(n))
        (hosting.home(V4_ONLY.domain) / "secret").write_text("cde's mail")
        lab.popen(lab.net, [sys.executable, "-c", LISTENER, "::", str(REMOTE_PORT)])
        lab.popen(lab.host, [sys.executable, "-c", LISTENER, "::", str(HOST_PORT_ANY)])
        lab.popen(lab.host, [sys.executable, "-c", LISTENER, "0.0.0.0", str(HOST_PORT_ANY4)])
        zygote = Zygote()
        zygote.start()
        lab.defer(lambda: _end_zygote(zygote))
        time.sleep(0.5)
        yield Jails(lab, config, names, zygote)


def _end_zygote(zygote: Zygote) -> None:
    pid = zygote.pid
    zygote.close()
    if pid is not None:
        os.waitpid(pid, 0)


# A listener on address argv[1], port argv[2] that answers each connection with the peer
# address it saw.
LISTENER = """
import socket, sys
if sys.argv[1] == "::":
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
else:
    s = socket.socket(socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
while True:
    c, peer = s.accept()
    c.sendall(peer[0].removeprefix("::ffff:").encode())
    c.close()
"""


def outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    return "ok"


def seen_from(address: str, port: int, source: str | None = None) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    host, _, link = address.partition("%")  # a link-local address names its link
    where = (host, port, 0, socket.if_nametoindex(link)) if link else (host, port)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        if source:
            s.bind((source, 0))
        s.connect(where)
        return s.recv(100).decode()


def probe_source_addresses(fds: list[int], remotes: list[str]) -> dict[str, str]:
    return {remote: seen_from(remote, REMOTE_PORT) for remote in remotes}


def test_a_tenant_connects_only_from_its_own_address(jails: Jails) -> None:
    for spec in THREE:
        expected = {
            remote: mine for remote, mine in ((MX_V4, spec.ipv4), (MX_V6, spec.ipv6)) if mine
        }
        seen = jails.run(spec.domain, probe_source_addresses, list(expected))
        assert seen == expected, spec.domain


def probe_privileges(fds: list[int]) -> dict[str, Any]:
    return {
        "setuid": outcome(lambda: os.setuid(0)),
        "setresuid": outcome(lambda: os.setresuid(0, 0, 0)),
        "setgid": outcome(lambda: os.setgid(0)),
        "setgroups": outcome(lambda: os.setgroups([0])),
        "cap_effective": outcome(lambda: setattr(prctl.cap_effective, "net_admin", True)),
        "cap_permitted": outcome(lambda: setattr(prctl.cap_permitted, "sys_admin", True)),
        "ids": [os.getresuid(), os.getresgid(), os.getgroups()],
        "no_new_privs": prctl.get_no_new_privs(),
    }


def test_privileges_cannot_be_regained(jails: Jails) -> None:
    uid = jails.tenant(DUAL.domain).uid
    assert jails.run(DUAL.domain, probe_privileges) == {
        "setuid": "EPERM",
        "setresuid": "EPERM",
        "setgid": "EPERM",
        "setgroups": "EPERM",
        "cap_effective": "EPERM",
        "cap_permitted": "EPERM",
        "ids": [[uid] * 3, [uid] * 3, []],
        "no_new_privs": 1,
    }


def test_the_kernel_confirms_the_jail_from_outside(jails: Jails) -> None:
    tenant = jails.tenant(DUAL.domain)
    pid = jails.start_sleeper(DUAL.domain)
    try:
        time.sleep(0.3)
        with open(f"/proc/{pid}/status") as f:
            assert check_status(f.read(), tenant.uid, tenant.gid) == []
        assert os.readlink(f"/proc/{pid}/root") == str(tenant.home)
        namespace = os.stat(jails.names[DUAL.domain].path).st_ino
        assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{namespace}]"
        # A child of the supervisor (re-parented from the zygote), dying with it.
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rpartition(")")[2].split()[1]) == os.getpid()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def probe_setns(fds: list[int]) -> dict[str, str]:
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        if libc.setns(fds[1], 0) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    return {"setns": outcome(enter)}


def test_a_leaked_namespace_descriptor_is_useless(jails: Jails) -> None:
    with inside(NETNS_DIR / jails.lab.host):
        leaked = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        result = jails.run(DUAL.domain, probe_setns, keep=(leaked,))
    finally:
        os.close(leaked)
    assert result == {"setns": "EPERM"}


def probe_chroot(fds: list[int], other_home: str) -> dict[str, Any]:
    os.makedirs("/escape", exist_ok=True)
    return {
        "chroot": outcome(lambda: os.chroot("/escape")),
        "dotdot": sorted(os.listdir("/../../..")) == sorted(os.listdir("/")),
        "etc_passwd": outcome(lambda: open("/etc/passwd")),
        "proc": outcome(lambda: open("/proc/1/root/etc/shadow")),
        "other_home": outcome(lambda: open(f"{other_home}/secret")),
    }


def test_the_chroot_holds(jails: Jails) -> None:
    other_home = str(jails.tenant(V4_ONLY.domain).home)
    assert jails.run(DUAL.domain, probe_chroot, other_home) == {
        "chroot": "EPERM",
        "dotdot": True,
        "etc_passwd": "ENOENT",
        "proc": "ENOENT",
        "other_home": "ENOENT",
    }


def bind(address: str, freebind: bool = False) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if freebind:
            s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            s.bind((address, 0))
            s.settimeout(5)
            return outcome(lambda: s.connect((MX_V4, REMOTE_PORT)))
        return outcome(lambda: s.bind((address, 0)))


def probe_addresses(fds: list[int]) -> dict[str, str]:
    return {
        "host_v4": bind(HOST_V4),
        "host_v6": bind(HOST_V6),
        "bridge_v4": bind(BRIDGE_V4),
        "other_tenant": bind(V4_ONLY.ipv4 or ""),
        "other_tenant_freebind_connect": bind(V4_ONLY.ipv4 or "", freebind=True),
        "own": bind(DUAL.ipv4 or ""),
    }


def test_no_other_address_can_be_used(jails: Jails) -> None:
    assert jails.run(DUAL.domain, probe_addresses) == {
        "host_v4": "EADDRNOTAVAIL",
        "host_v6": "EADDRNOTAVAIL",
        "bridge_v4": "EADDRNOTAVAIL",
        "other_tenant": "EADDRNOTAVAIL",
        "other_tenant_freebind_connect": "ENETUNREACH",
        "own": "ok",
    }


def probe_raw_sockets(fds: list[int]) -> dict[str, str]:
    return {
        "raw4": outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1).close()),
        "raw6": outcome(lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58).close()),
        "packet": outcome(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
    }


def test_no_raw_or_packet_sockets(jails: Jails) -> None:
    assert jails.run(DUAL.domain, probe_raw_sockets) == {
        "raw4": "EPERM",
        "raw6": "EPERM",
        "packet": "EPERM",
    }


def probe_loopback(fds: list[int]) -> dict[str, str]:
    return {
        "v4": outcome(lambda: seen_from("127.0.0.1", HOST_PORT_ANY)),
        "v6": outcome(lambda: seen_from("::1", HOST_PORT_ANY)),
    }


def test_the_host_namespace_loopback_is_out_of_reach(jails: Jails) -> None:
    # A listener on 127.0.0.1 of the hosting machine's namespace answers there...
    code = f"import socket\n{inspect.getsource(seen_from)}\n"
    code += f"print(seen_from('127.0.0.1', {HOST_PORT_ANY}))"
    here = jails.lab.run(jails.lab.host, [sys.executable, "-c", code])
    assert here.stdout.strip() == "127.0.0.1"
    # ...but a tenant's 127.0.0.1 is its own namespace's loopback, where nothing listens.
    assert jails.run(DUAL.domain, probe_loopback) == {"v4": "ECONNREFUSED", "v6": "ECONNREFUSED"}


def host_addresses(jails: Jails, domain: str) -> dict[str, str]:
    """Every address of the host namespace that `domain`'s worker could aim at: all but
    loopback, and of the IPv6 link-local ones those on the tenant's link. Each maps to
    itself as the host namespace writes it (a link-local one names the host's link, not
    the tenant's eth0)."""
    if jails.config.network.mode == "bridge":
        link = BRIDGE
        named = [jails.config.network.gateway4, jails.config.network.gateway6]
    else:
        link = jails.names[domain].host_ifname
        named = [ROUTED_NEXT_HOP4, ROUTED_NEXT_HOP6]
    found = {}
    listed = jails.lab.run(jails.lab.host, ["ip", "-j", "addr"])
    for each in json.loads(listed.stdout):
        for record in each.get("addr_info", []):
            address = ip_address(record["local"])
            if address.is_loopback:
                continue
            if address.version == 6 and address.is_link_local:
                if each["ifname"] == link:
                    found[f"{address}%{TENANT_IFNAME}"] = f"{address}%{link}"
            else:
                found[str(address)] = str(address)
    # The uplink's addresses, and the tenants' gateways (the bridge's, or routed mode's
    # next hops): the list above is no shorter than what the host is known to have.
    wanted = {HOST_V4, HOST_V6, *(str(a) for a in named if a)}
    assert wanted <= {a.partition("%")[0] for a in found}, found
    return found


def targets(addresses: list[str]) -> list[tuple[str, int]]:
    """Each address with each host listener that takes it: `::` all, `0.0.0.0` IPv4."""
    return [
        (address, port)
        for address in addresses
        for port in (HOST_PORT_ANY, HOST_PORT_ANY4)
        if port == HOST_PORT_ANY or ":" not in address
    ]


def probe_host_addresses(fds: list[int], aims: list[tuple[str, int]]) -> dict[str, str]:
    # At once: over IPv6 the host's first ICMP error meets a socket that connect() still
    # holds, and only the retransmitted SYN's, a second later, ends it.
    with ThreadPoolExecutor(len(aims)) as pool:
        done = pool.map(lambda aim: outcome(lambda: seen_from(*aim)), aims)
        return {f"{a} {port}": result for (a, port), result in zip(aims, done, strict=True)}


HOST_CHECK = f"""
from __future__ import annotations
import errno, json, socket, sys
{inspect.getsource(outcome)}
{inspect.getsource(seen_from)}
aims = json.loads(sys.argv[1])
print(json.dumps({{f"{{a}} {{port}}": outcome(lambda: seen_from(a, port)) for a, port in aims}}))
"""


def test_the_host_namespace_own_addresses_are_out_of_reach(jails: Jails) -> None:
    for spec in THREE:
        addresses = host_addresses(jails, spec.domain)
        mine = [a for a in addresses if (":" in a and spec.ipv6) or (":" not in a and spec.ipv4)]
        # The host namespace reaches its own listeners on every one of these addresses...
        here = [(addresses[a], port) for a, port in targets(mine)]
        seen = jails.lab.run(jails.lab.host, [sys.executable, "-c", HOST_CHECK, json.dumps(here)])
        assert set(json.loads(seen.stdout).values()) == {"ok"}, seen.stdout
        # ...a tenant's worker none: the host turns it away as administratively
        # prohibited (ICMP), which ends its connect() rather than letting it time out.
        refused = {"4": "EHOSTUNREACH", "6": "EACCES"}
        expected = {f"{a} {port}": refused["6" if ":" in a else "4"] for a, port in targets(mine)}
        assert jails.run(spec.domain, probe_host_addresses, targets(mine)) == expected, spec


def probe_other_worker(fds: list[int], victim: int) -> dict[str, str]:
    libc = ctypes.CDLL(None, use_errno=True)
    ptrace_attach = 16
    rc = libc.ptrace(ptrace_attach, victim, None, None)
    return {
        "ptrace": errno.errorcode[ctypes.get_errno()] if rc != 0 else "ok",
        "kill": outcome(lambda: os.kill(victim, signal.SIGKILL)),
    }


def test_another_workers_process_cannot_be_traced_or_signalled(jails: Jails) -> None:
    victim = jails.start_sleeper(V4_ONLY.domain)
    try:
        result = jails.run(DUAL.domain, probe_other_worker, victim)
        assert result == {"ptrace": "EPERM", "kill": "EPERM"}
        assert os.waitpid(victim, os.WNOHANG) == (0, 0), "the victim died"
    finally:
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)


def test_a_jail_that_cannot_be_entered_ends_the_child(jails: Jails, tmp_path: Any) -> None:
    # The home is missing: the child must end before running anything, never unjailed.
    tenant = jails.tenant(DUAL.domain)
    identity = Identity(tenant.uid, tenant.gid, tmp_path / "missing")
    pid = jails.spawn("doomed", DUAL.domain, [], _never_run, identity)
    assert os.waitstatus_to_exitcode(wait_adopted(pid)) == 70


@pytest.mark.parametrize("replaced", ["the home", "a directory above it"])
def test_a_jail_is_never_entered_through_a_symlink(
    jails: Jails, tmp_path: Any, replaced: str
) -> None:
    """Where the home (or a directory on its path) was, a symlink to another tenant's
    home: the child ends before running anything, never jailed there."""
    tenant = jails.tenant(DUAL.domain)
    other = jails.tenant(V4_ONLY.domain).home
    if replaced == "the home":
        root = tmp_path / "home"
        root.symlink_to(other)
    else:
        (tmp_path / "tenants").symlink_to(other.parent)
        root = tmp_path / "tenants" / other.name
    identity = Identity(tenant.uid, tenant.gid, root)
    pid = jails.spawn("doomed", DUAL.domain, [], _never_run, identity)
    assert os.waitstatus_to_exitcode(wait_adopted(pid)) == 70


def _never_run(fds: list[int]) -> Callable[[], None]:
    def main() -> None:
        os._exit(0)  # would turn the expected exit status 70 into 0

    return main


def _load_colorsys() -> None:
    import colorsys  # noqa: F401 (a module nothing else in these tests loads)


def _cannot_load() -> None:
    raise RuntimeError("a module is missing")


def probe_modules(fds: list[int], names: list[str]) -> dict[str, bool]:
    return {name: name in sys.modules for name in names}


def _with_zygote(jails: Jails, prelude: Callable[[], None]) -> Jails:
    zygote = Zygote(prelude)
    zygote.start()
    jails.lab.defer(lambda: _end_zygote(zygote))
    return replace(jails, zygote=zygote)


def test_the_zygote_loads_its_prelude_for_its_children(jails: Jails) -> None:
    """What the prelude loads (nsmail.root.children: the worker's modules), every child
    has without loading it, and the process that forked the zygote never loaded."""
    assert "colorsys" not in sys.modules
    loading = _with_zygote(jails, _load_colorsys)
    assert loading.run(DUAL.domain, probe_modules, ["colorsys"]) == {"colorsys": True}
    assert jails.run(DUAL.domain, probe_modules, ["colorsys"]) == {"colorsys": False}
    assert "colorsys" not in sys.modules


def test_a_zygote_whose_prelude_fails_still_starts_children(
    jails: Jails, capfd: pytest.CaptureFixture[str]
) -> None:
    """Its children then load what they run themselves, and fail on their own if they must."""
    failing = _with_zygote(jails, _cannot_load)
    assert failing.run(DUAL.domain, probe_modules, ["colorsys"]) == {"colorsys": False}
    assert "nsmail: zygote: RuntimeError: a module is missing" in capfd.readouterr().err
