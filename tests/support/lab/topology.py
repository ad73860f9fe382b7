"""A throwaway two-namespace network: a "hosting machine" and "the internet" it talks to.

Layout (all names start with a per-run random prefix, e.g. ``t3f9a``)::

    {prefix}host                              {prefix}net
      nsbr0 198.51.100.1/24 (bridge=True)       eth0 203.0.113.25/24   (MX)
            2001:db8:51::1/64                        203.0.113.53/24   (DNS)
      up0   203.0.113.1/24  <--- veth --->           2001:db8:113::25/64
            2001:db8:113::1/64                       2001:db8:113::53/64
      (forwarding on)                           routes 198.51.100.0/24, 2001:db8:51::/64
                                                via the host side of the veth

The host namespace has no default route: it reaches only 203.0.113.0/24 and
2001:db8:113::/64, which is all the lab's "internet" holds.

Commands run in a namespace through ``nsenter --net=/run/netns/NAME``, never ``ip netns
exec``: the latter unshares the mount namespace with slave propagation, so namespaces that
the supervisor under test creates (bind mounts under /run/netns) would stay invisible to
the rest of the machine. Such processes see the machine's own /etc/resolv.conf, unless
started with ``resolver=True``: then ``unshare --mount --propagation unchanged`` gives
them a mount namespace in which only / is made private and ``self.resolv_conf`` (the lab
DNS at ``DNS_V4``/``DNS_V6``) is bind-mounted over /etc/resolv.conf, while /run/netns
stays shared with the machine's, so namespaces created inside are still seen outside.

Teardown (``close``, also run by ``__exit__`` and when setup fails half-way) is
idempotent and sweeps every /run/netns/{prefix}* namespace, so tenant namespaces named
``{prefix}-...`` by the supervisor under test are removed with the lab.

Security: runs as root and creates/deletes kernel objects; it only ever touches
namespaces whose names start with its own random prefix, and only documentation
addresses (never 192.0.2.0/24 or fd00::/64, the machine's real uplink).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

NETNS_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
# nsmail refuses a tenant home under a world-writable directory such as /tmp, so labs (and,
# through tests/conftest.py, every test's temporary files) live here: root's, mode 0755.
TEMP_ROOT = Path("/var/cache/nsmail-tests")

HOST_V4 = "203.0.113.1"
HOST_V6 = "2001:db8:113::1"
MX_V4 = "203.0.113.25"
MX_V6 = "2001:db8:113::25"
DNS_V4 = "203.0.113.53"
DNS_V6 = "2001:db8:113::53"
BRIDGE = "nsbr0"
BRIDGE_V4 = "198.51.100.1"
BRIDGE_V6 = "2001:db8:51::1"
UPLINK = "up0"

_KILL_GRACE = 2.0
_OWNER = "owner"  # in a lab's directory: the process that made it (see sweep_dead_labs)

# Run by sh in a fresh mount namespace that shares the parent's mount propagation:
# making / (only /, not its submounts) private keeps the resolv.conf bind mount local,
# while /run/netns, its own shared mount, stays a peer of the machine's, so namespaces
# created inside remain visible outside. $1 is the lab's resolv.conf, then the command.
_RESOLVER_SCRIPT = (
    'mount --make-private / && mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
)


class LabError(RuntimeError):
    """A lab command failed; the message carries its output."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _new_prefix() -> str:
    # A prefix must not be a prefix of anything already present, or teardown's sweep
    # of {prefix}* would reach another run's namespaces.
    while True:
        prefix = "t" + secrets.token_hex(2)
        if not any(p.name.startswith(prefix) for p in _list_netns()):
            return prefix


def _namespaces(prefix: str) -> list[str]:
    return [p.name for p in _list_netns() if p.name.startswith(prefix)]


def _list_netns() -> list[Path]:
    try:
        return sorted(NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def temp_root() -> Path:
    """TEMP_ROOT, made (again) root's and 0755."""
    TEMP_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(TEMP_ROOT, 0, 0)
    TEMP_ROOT.chmod(0o755)
    return TEMP_ROOT


class Lab:
    """Two namespaces joined by a veth, plus helpers to run things inside them."""

    def __init__(self, *, bridge: bool = True) -> None:
        self.bridge = bridge
        self.prefix = _new_prefix()
        self.host = f"{self.prefix}host"
        self.net = f"{self.prefix}net"
        sweep_dead_labs()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"lab-{self.prefix}-", dir=temp_root()))
        (self.tmp / _OWNER).write_text(_process_identity(os.getpid()) or "")
        # Postfix and NSD drop privileges and must be able to traverse into here.
        self.tmp.chmod(0o755)
        self.resolv_conf = self.tmp / "resolv.conf"
        self.resolv_conf.write_text(
            f"nameserver {DNS_V4}\nnameserver {DNS_V6}\noptions timeout:1 attempts:2\n"
        )
        self.resolv_conf.chmod(0o644)
        self._procs: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Callable[[], None]] = []
        # Until this lab has created its first namespace, the prefix may be another run's.
        self._owns_prefix = False
        self._closed = False

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self) -> None:
        host, net = self.host, self.net
        _ip("netns", "add", host)
        self._owns_prefix = True
        _ip("netns", "add", net)
        for ns in (host, net):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", host, "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", net)
        _ip("-n", host, "addr", "add", f"{HOST_V4}/24", "dev", UPLINK)
        _ip("-n", host, "addr", "add", f"{HOST_V6}/64", "dev", UPLINK, "nodad")
        _ip("-n", host, "link", "set", UPLINK, "up")
        for addr in (MX_V4, DNS_V4):
            _ip("-n", net, "addr", "add", f"{addr}/24", "dev", "eth0")
        for addr in (MX_V6, DNS_V6):
            _ip("-n", net, "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
        _ip("-n", net, "link", "set", "eth0", "up")
        _ip("-n", net, "route", "add", "198.51.100.0/24", "via", HOST_V4)
        _ip("-n", net, "route", "add", "2001:db8:51::/64", "via", HOST_V6)
        if self.bridge:
            _ip("-n", host, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", host, "addr", "add", f"{BRIDGE_V4}/24", "dev", BRIDGE)
            _ip("-n", host, "addr", "add", f"{BRIDGE_V6}/64", "dev", BRIDGE, "nodad")
            _ip("-n", host, "link", "set", BRIDGE, "up")
        # /proc/sys/net shows the writer's namespace, so this must run inside it.
        self.run(
            host, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        )

    # -- running things inside a namespace ---------------------------------------------

    def nsenter(self, ns: str, argv: Sequence[str], *, resolver: bool = False) -> list[str]:
        """The argv that runs ``argv`` inside network namespace ``ns``.

        With ``resolver``, /etc/resolv.conf reads as ``self.resolv_conf`` (the lab DNS)
        for that process tree only; see the module docstring.
        """
        enter = ["nsenter", f"--net={NETNS_DIR / ns}", "--", *argv]
        if not resolver:
            return enter
        unshare = ["unshare", "--mount", "--propagation", "unchanged", "--"]
        return [*unshare, "sh", "-c", _RESOLVER_SCRIPT, "sh", str(self.resolv_conf), *enter]

    def run(
        self, ns: str, argv: Sequence[str], *, resolver: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``ns``; defaults: check, captured text output, 60 s."""
        kw.setdefault("check", True)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.nsenter(ns, argv, resolver=resolver), **kw)

    def popen(
        self, ns: str, argv: Sequence[str], *, resolver: bool = False, **kw: Any
    ) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside ``ns`` in its own process group, killed at teardown."""
        kw["start_new_session"] = True
        argv = self.nsenter(ns, argv, resolver=resolver)
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kw)
        self._procs.append(proc)
        return proc

    def python(
        self, ns: str, code: str, *, resolver: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``sys.executable -c code`` inside ``ns`` (same defaults as ``run``)."""
        return self.run(ns, [sys.executable, "-c", code], resolver=resolver, **kw)

    # -- resources owned by the lab ----------------------------------------------------

    def tempdir(self, name: str) -> Path:
        """A fresh directory (mode 0755) under the lab's temporary directory."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp))
        path.chmod(0o755)
        return path

    def defer(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` at teardown, before processes are killed (last deferred first)."""
        self._cleanups.append(cleanup)

    def namespaces(self) -> list[str]:
        """Every namespace named with this lab's prefix, including ones the code under test made."""
        return _namespaces(self.prefix)

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Tear everything down; safe to call more than once and after a failed setup."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{cleanup!r}: {exc!r}")
        for proc in self._procs:
            _kill_group(proc)
        if self._owns_prefix:
            errors += _remove_namespaces(self.prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))


def sweep_dead_labs() -> list[str]:
    """Tear down the labs of processes that died without closing them (a SIGKILLed
    pytest): their namespaces, the processes in them and their files. The prefixes swept.

    A lab's directory names the process that made it (pid and start time, so a reused
    pid does not pass for it); labs of live processes, and a prefix one of them uses, are
    left alone.
    """
    dead: dict[str, Path] = {}
    alive: set[str] = set()
    for owner in temp_root().glob("lab-t*-*/" + _OWNER):
        prefix = owner.parent.name.split("-")[1]
        try:
            recorded = owner.read_text()
            running = _process_identity(int(recorded.split()[0]))
        except (OSError, ValueError, IndexError):
            continue  # being written, or not a lab's
        if running == recorded:
            alive.add(prefix)
        else:
            dead[prefix] = owner.parent
    for prefix, directory in dead.items():
        if prefix not in alive:
            _remove_namespaces(prefix)
        shutil.rmtree(directory, ignore_errors=True)
    return sorted(dead)


def _process_identity(pid: int) -> str | None:
    """`pid` and its start time, or None when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            started = f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
    return f"{pid} {started}"


def _remove_namespaces(prefix: str) -> list[str]:
    """Kill what runs in every namespace named with `prefix`, delete them; the errors."""
    errors = []
    for ns in _namespaces(prefix):
        _kill_netns_pids(ns)
        result = subprocess.run(
            ["ip", "netns", "del", ns], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            errors.append(f"ip netns del {ns}: {result.stderr.strip()}")
    for path in ETC_NETNS_DIR.glob(f"{prefix}*"):
        shutil.rmtree(path, ignore_errors=True)
    return errors


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_KILL_GRACE)
    # The leader may be gone while children of its group live on.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(_KILL_GRACE)


def _netns_pids(ns: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
    )
    return [int(word) for word in result.stdout.split()]


def _kill_netns_pids(ns: str) -> None:
    deadline = time.monotonic() + _KILL_GRACE
    while pids := _netns_pids(ns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
