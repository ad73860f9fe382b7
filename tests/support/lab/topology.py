"""The test lab: `nsmail.lab.topology`'s network, with a random prefix, and ways into it.

Each lab draws a prefix (e.g. ``t3f9a``) that no namespace began with, so it owns every
namespace named ``{prefix}...``: its ``{prefix}host`` and ``{prefix}net`` (see
``nsmail.lab.topology`` for their layout) and whatever the code under test adds, such as
the ``{prefix}-<domain>`` tenant namespaces of a supervisor configured with that prefix.

Commands run in a namespace through ``nsenter --net=/run/netns/NAME``, never ``ip netns
exec``: the latter unshares the mount namespace with slave propagation, so namespaces that
the supervisor under test creates (bind mounts under /run/netns) would stay invisible to
the rest of the machine. Such processes see the machine's own /etc/resolv.conf, unless
started with ``resolver=True``: then ``unshare --mount --propagation unchanged`` gives
them a mount namespace in which only / is made private and ``self.resolv_conf`` (the lab
DNS at ``DNS_V4``/``DNS_V6``) is bind-mounted over /etc/resolv.conf, while /run/netns
stays shared with the machine's, so namespaces created inside are still seen outside.

Teardown (``close``, also run by ``__exit__`` and when setup fails half-way) is
idempotent and removes every namespace the lab owns, what runs in them and its directory.
The directory holds the lab's inventory, written before the first namespace exists, so a
lab whose pytest was killed is swept by the next lab made (``sweep_dead_labs``).

Security: test infrastructure, runs as root and creates/deletes kernel objects through
``nsmail.lab.topology``, which only ever touches namespaces its own prefix owns and only
documentation addresses (never 192.0.2.0/24 or fd00::/64, the machine's real uplink).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from nsmail.lab import topology
from nsmail.lab.topology import DNS_V4, DNS_V6, NETNS_DIR, Inventory, Proc

# nsmail refuses a tenant home under a world-writable directory such as /tmp, so labs (and,
# through tests/conftest.py, every test's temporary files) live here: root's, mode 0755.
TEMP_ROOT = Path("/var/cache/nsmail-tests")
INVENTORY = "inventory.json"  # in a lab's directory
_KILL_GRACE = 2.0

# Run by sh in a fresh mount namespace that shares the parent's mount propagation:
# making / (only /, not its submounts) private keeps the resolv.conf bind mount local,
# while /run/netns, its own shared mount, stays a peer of the machine's, so namespaces
# created inside remain visible outside. $1 is the lab's resolv.conf, then the command.
_RESOLVER_SCRIPT = (
    'mount --make-private / && mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
)


class LabError(RuntimeError):
    """A lab command failed; the message carries its output."""


def temp_root() -> Path:
    """TEMP_ROOT, made (again) root's and 0755."""
    TEMP_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(TEMP_ROOT, 0, 0)
    TEMP_ROOT.chmod(0o755)
    return TEMP_ROOT


class Lab:
    """The lab's two namespaces (with or without the bridge), plus ways to run things inside."""

    def __init__(self, *, bridge: bool = True) -> None:
        self.bridge = bridge
        self.names = topology.new_names()
        self.prefix = self.names.prefix
        self.host = self.names.host
        self.net = self.names.net
        sweep_dead_labs()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"lab-{self.prefix}-", dir=temp_root()))
        owner = Proc.of("owner", os.getpid())
        self._inventory = Inventory(self.names, owner, tmp=str(self.tmp))
        topology.save(self._inventory, self.tmp / INVENTORY)
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
        self._owns_prefix = True  # from here on, unless its host namespace is another lab's
        try:
            topology.build(self.names, bridge=self.bridge)
        except topology.PrefixTaken:
            self._owns_prefix = False
            raise

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
        """Every namespace this lab owns, including ones the code under test made."""
        return topology.owned(self.names)

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
            errors += topology.take_down(self._inventory)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))


def sweep_dead_labs() -> list[str]:
    """Tear down the labs of processes that died without closing them (a SIGKILLed
    pytest): their namespaces, the processes in them and their files. The prefixes swept.

    A lab's inventory names the process that made it (pid and start time, so a reused
    pid does not pass for it); labs of live processes, and a prefix one of them uses, are
    left alone.
    """
    return topology.sweep(temp_root().glob(f"lab-t*-*/{INVENTORY}"))


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
