"""The baseline nsmail is measured against: one sending Postfix for all tenants, the usual way.

This is what a hosting provider runs today: one Postfix instance in one network namespace
(here `{lab.prefix}pf`, bridged into the lab host's `nsbr0` like nsmail's tenants) that
holds every tenant's addresses. `sender_dependent_default_transport_maps` sends each
tenant's mail through a master.cf transport of its own, an smtp(8) client with
`-o smtp_bind_address=... -o smtp_bind_address6=... -o smtp_helo_name=<tenant domain>`;
`relayhost` is empty, the recipient's MX comes from the lab DNS, and concurrency, process
limits and connection caching keep Postfix's defaults. Both sides prefer IPv6 to reach
the MX (nsmail always does; here `smtp_address_preference = ipv6`), so they take the
same path.

The instance has its own configuration directory and queue in a lab temporary
directory, never the machine's /etc/postfix. Tenant users must be able to run Postfix's
plain `/usr/sbin/sendmail`, but its set-gid `postdrop` refuses a non-default
configuration directory (MAIL_CONFIG, -C) that the default main.cf does not list, and
this machine has no default main.cf. So every Postfix process, the daemons and the
submitting commands alike, runs in a private mount namespace (`unshare --mount`, whose
default propagation is private) in which that directory is bind-mounted over
/etc/postfix and the lab's resolv.conf over /etc/resolv.conf: within it this is simply
the default instance. Nothing is mounted in the machine's own mount namespace.

The master.cf is Debian's without chroot (which would need copies of resolv.conf and
friends in the queue directory) and without smtpd (this instance only sends). Start-up
is `master -w` directly, as in `tests/support/lab/postfix.py`, whose queue directory table is
reused.

Security: benchmark infrastructure, runs as root; creates only its own prefixed
namespace and documentation addresses inside it, and mounts only in private mount
namespaces.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from hosting import HOST_NAME, TenantSpec
from lab import BRIDGE, BRIDGE_V4, BRIDGE_V6, Lab, LabError
from lab.postfix import MASTER, MASTER_CF, QUEUE_DIRS, stop_master
from lab.topology import NETNS_DIR

SENDMAIL = "/usr/sbin/sendmail"
LINK = "pf0"  # the host end of the veth, a port of the lab bridge
_STOP_TIMEOUT = 10.0

# Binds our configuration directory and resolv.conf, then runs the rest of the arguments.
_MOUNT_SCRIPT = (
    'mount --bind "$1" /etc/postfix && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
)

# The lab receiver's master.cf without its smtpd: a sending instance.
_MASTER_CF = "".join(
    line for line in MASTER_CF.splitlines(keepends=True) if not line.startswith("smtp       inet")
)


def transport(index: int) -> str:
    """The master.cf service name of tenant `index`."""
    return f"t{index}"


class SendingPostfix:
    """A stopped sending Postfix for `tenants`, with its network; `start` runs it.

    It holds the tenants' addresses only while it runs, so that its rounds and nsmail's,
    whose tenant namespaces hold the same addresses on the same bridge, can take turns.
    """

    def __init__(self, lab: Lab, tenants: Sequence[TenantSpec]) -> None:
        self.lab = lab
        self.tenants = tuple(tenants)
        self.ns = f"{lab.prefix}pf"
        self.dir = lab.tempdir("sender")
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.master_pid: int | None = None
        self._addressed = False
        lab.defer(self.stop)
        self._write_config()
        self._network()

    # -- running things as part of this instance ---------------------------------------

    def wrap(self, argv: Sequence[str], *, in_namespace: bool = False) -> list[str]:
        """`argv` run with this instance as the default Postfix (optionally in its netns)."""
        enter = ["nsenter", f"--net={NETNS_DIR / self.ns}", "--"] if in_namespace else []
        mount = ["unshare", "--mount", "--", "sh", "-c", _MOUNT_SCRIPT, "sh"]
        return [*mount, str(self.etc), str(self.lab.resolv_conf), *enter, *argv]

    def queued(self) -> int:
        """Messages anywhere in the queue (maildrop, incoming, active, deferred, hold)."""
        states = ("maildrop", "incoming", "active", "deferred", "hold")
        return sum(len(files) for state in states for _, _, files in os.walk(self.spool / state))

    def log(self) -> str:
        try:
            return (self.dir / "log" / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> subprocess.Popen[bytes]:
        """Take the tenants' addresses and start the master (`master -w` returns once it
        is up); the caller waits for it."""
        if not self._addressed:
            self._take_addresses()
        argv = self.wrap([MASTER, "-w"], in_namespace=True)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def started(self, starter: subprocess.Popen[bytes]) -> int:
        """Wait for `start`'s command; the master's pid."""
        output, _ = starter.communicate(timeout=30)
        if starter.returncode != 0:
            raise LabError(f"postfix start: {output.decode(errors='replace')}\n{self.log()}")
        self.master_pid = int((self.spool / "pid" / "master.pid").read_text().split()[0])
        return self.master_pid

    def stop(self) -> None:
        """SIGTERM to the master, as `postfix stop` does; wait until it is gone (idempotent)."""
        pid, self.master_pid = self.master_pid, None
        if pid is not None:
            stop_master(pid)
        if self._addressed:
            # All at once: removing a primary IPv4 address removes its secondaries too.
            _ip("-n", self.ns, "addr", "flush", "dev", "eth0")
            self._addressed = False

    # -- set-up ------------------------------------------------------------------------

    def _network(self) -> None:
        host, ns = self.lab.host, self.ns
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", host, "link", "add", LINK, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", host, "link", "set", LINK, "master", BRIDGE, "up")
        # No link-local address: no DAD, router solicitations or MLD reports, as nsmail's.
        _ip("-n", ns, "link", "set", "eth0", "addrgenmode", "none")
        _ip("-n", ns, "link", "set", "eth0", "up")

    def _take_addresses(self) -> None:
        """The tenants' addresses, and the routes that go with them."""
        ns = self.ns
        for t in self.tenants:
            if t.ipv4:
                _ip("-n", ns, "addr", "add", f"{t.ipv4}/24", "dev", "eth0")
            if t.ipv6:
                _ip("-n", ns, "addr", "add", f"{t.ipv6}/64", "dev", "eth0", "nodad")
        _ip("-n", ns, "route", "replace", "default", "via", BRIDGE_V4)
        _ip("-n", ns, "-6", "route", "replace", "default", "via", BRIDGE_V6)
        # The gateway still has these addresses at the link address of their last holder
        # (an nsmail tenant's veth, gone), and would send there until its entries time
        # out: it must ask again.
        _ip("-n", self.lab.host, "neigh", "flush", "dev", BRIDGE)
        self._addressed = True

    def _write_config(self) -> None:
        d = self.dir
        postfix = pwd.getpwnam("postfix")
        for sub in ("etc", "spool", "data", "log"):
            (d / sub).mkdir(mode=0o755)
        os.chown(d / "data", postfix.pw_uid, postfix.pw_gid)
        postdrop = grp.getgrnam("postdrop").gr_gid
        for name, (mode, postfix_owned, postdrop_group) in QUEUE_DIRS.items():
            path = self.spool / name
            path.mkdir()
            os.chown(
                path, postfix.pw_uid if postfix_owned else 0, postdrop if postdrop_group else 0
            )
            path.chmod(mode)
        senders = self.etc / "sender_transport"
        senders.write_text(
            "".join(f"@{t.domain} {transport(i)}:\n" for i, t in enumerate(self.tenants))
        )
        main_cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool),
            "data_directory": f"{d}/data",
            "maillog_file": f"{d}/log/maillog",
            "maillog_file_prefixes": str(d),
            "myhostname": HOST_NAME,
            "myorigin": "$myhostname",
            "mydestination": "",
            "relayhost": "",
            "inet_protocols": "all",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtp_address_preference": "ipv6",
            "sender_dependent_default_transport_maps": f"texthash:{senders}",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
        (self.etc / "master.cf").write_text(_MASTER_CF + "".join(self._transports()))
        # Postfix rereads a main.cf younger than about two seconds (it might be mid-edit).
        past = time.time() - 60
        for path in self.etc.iterdir():
            os.utime(path, (past, past))

    def _transports(self) -> list[str]:
        lines = []
        for i, t in enumerate(self.tenants):
            options = [f"-o smtp_helo_name={t.domain}"]
            options += [f"-o smtp_bind_address={t.ipv4}"] if t.ipv4 else []
            options += [f"-o smtp_bind_address6={t.ipv6}"] if t.ipv6 else []
            lines.append(f"{transport(i)} unix - - n - - smtp\n  " + " ".join(options) + "\n")
        return lines


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _alive(pid: int) -> bool:
    # A zombie counts as gone: this machine's init reaps orphans only every second or so.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
