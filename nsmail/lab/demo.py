"""`nsmail demo`: a throwaway lab showing what a receiving MTA sees of tenants' mail,
sent the usual way and sent by nsmail.

It builds two network namespaces: `demohost`, a hosting machine (abc.test, 203.0.113.1)
with the bridge its tenants plug into, and `demonet`, "the internet", holding the lab DNS
server and a receiving MTA (mx.test) that looks up each client's name (FCrDNS) and records
the Received header it writes. It starts the real `nsmail supervise` in `demohost` for
three tenants (namespaces `demo-<domain>`), submits one message per tenant through the
real `nsmail-sendmail` as the tenant's uid and one the usual way (from the hosting
machine's own address, with the tenant's name in EHLO), then shows both verdicts side by
side, and `nsmail status`.

Everything it makes is a namespace named `demohost`, `demonet` or `demo-*` (its links live
inside them), a process, or a file in one temporary directory; each is recorded in
/run/nsmail-demo/state.json before or as it is made. The end of the run (also on Ctrl-C,
SIGTERM or any error), or `nsmail demo --down` after `--keep`, removes exactly that. A new
demo is refused while a kept one is up or another demo runs; what a killed demo left is
removed first. For tests of the cleanup, `NSMAIL_DEMO_FAIL_AT=STAGE` (namespaces, servers,
supervisor or sending) makes the run fail right after that stage.

Security: runs as root. It creates and removes only the namespaces named above, kills only
processes it recorded (matched by pid and start time) or finds inside those namespaces,
and puts only documentation addresses (198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)
into its own namespaces, never into the machine's. It reads its own root-only state file
and the verdicts the lab receiver writes; the lab servers parse the network input.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import ipaddress
import itertools
import json
import os
import pwd
import selectors
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from pyroute2 import IPRoute

from nsmail.lab.receiver import VERDICTS, address_literal
from nsmail.root import netns, rtnetlink

HOST_NAME = "abc.test"
HOST_V4, HOST_V6 = "203.0.113.1", "2001:db8:113::1"
MX_NAME = "mx.test"
MX_V4, MX_V6 = "203.0.113.25", "2001:db8:113::25"
DNS_V4, DNS_V6 = "203.0.113.53", "2001:db8:113::53"
BRIDGE, BRIDGE_V4, BRIDGE_V6 = "nsbr0", "198.51.100.1", "2001:db8:51::1"
UPLINK = "up0"
PEER = "eth0"
# Fixed, at once usable link-local addresses instead of generated ones (which bring DAD
# delays and chatter): the kernel sends a neighbour solicitation for a forwarded packet
# only from a link-local address.
LINK_LOCAL_HOST, LINK_LOCAL_NET = "fe80::1", "fe80::2"
NET_ADDRESSES = ((MX_V4, 24), (DNS_V4, 24), (MX_V6, 64), (DNS_V6, 64), (LINK_LOCAL_NET, 64))
RECIPIENT_DOMAIN = "rcpt.test"
NSMAIL_RCPT = f"x1@{RECIPIENT_DOMAIN}"
NAIVE_RCPT = f"x2@{RECIPIENT_DOMAIN}"

PREFIX = "demo"  # the supervisor names tenant namespaces demo-<domain>
# Not demo-host: at start and stop the supervisor removes every demo-* namespace as stale.
LAB_HOST = netns.NETNS_DIR / "demohost"
LAB_NET = netns.NETNS_DIR / "demonet"
STATE_DIR = Path("/run/nsmail-demo")
STATE_FILE = STATE_DIR / "state.json"
TEMP_PREFIX = "nsmail-demo-"
TEMP_PARENT = Path("/run")  # root's and 0755: nsmail refuses tenant homes under /tmp
FIRST_UID = 61000  # above Debian's dynamic range (1000-59999), below nobody's 65534
FAIL_AT_ENV = "NSMAIL_DEMO_FAIL_AT"

READY_WAIT = 20.0
DELIVERY_WAIT = 20.0
SUPERVISOR_GRACE = 25.0  # it gives each worker 10 s, then waits up to 10 s for namespaces
SERVER_GRACE = 3.0
TABLE_WIDTH = 100
CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EX_NOPERM = 77


@dataclass(frozen=True, slots=True)
class DemoTenant:
    domain: str
    ipv4: str | None
    ipv6: str | None

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a)


TENANTS = (
    DemoTenant("bcd.test", "198.51.100.70", "2001:db8:51::70"),
    DemoTenant("cde.test", "198.51.100.71", None),
    DemoTenant("def.test", None, "2001:db8:51::72"),
)


class DemoError(Exception):
    """The demo cannot go on; the message is the one line shown to the user."""


class Interrupted(Exception):
    """A signal asked the demo to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- pure: what the lab holds and what it shows ----------------------------------------


def dns_records(tenants: Sequence[DemoTenant]) -> list[tuple[str, str, str]]:
    """Forward and reverse DNS for the hosting machine, the receiving MX and the tenants."""
    named = [(HOST_NAME, HOST_V4), (HOST_NAME, HOST_V6), (MX_NAME, MX_V4), (MX_NAME, MX_V6)]
    named += [(t.domain, a) for t in tenants for a in t.addresses]
    records = [(RECIPIENT_DOMAIN, "MX", f"10 {MX_NAME}"), (BRIDGE_V4, "PTR", HOST_NAME)]
    for name, address in named:
        rtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
        records += [(name, rtype, address), (address, "PTR", name)]
    return records


def config_text(tmp: Path, tenants: Sequence[DemoTenant], uids: Sequence[int]) -> str:
    """The nsmail configuration of the lab's hosting machine."""
    text = f"""\
[host]
name = "{HOST_NAME}"
resolvers = ["{DNS_V4}"]
run_dir = "{tmp / "run"}"

[network]
mode = "bridge"
bridge = "{BRIDGE}"
gateway4 = "{BRIDGE_V4}"
gateway6 = "{BRIDGE_V6}"
subnet4 = "198.51.100.0/24"
subnet6 = "2001:db8:51::/64"
prefix = "{PREFIX}"

[delivery]
scan_interval = 1
timeout = 5
"""
    for tenant, uid in zip(tenants, uids, strict=True):
        text += f'\n[[tenant]]\ndomain = "{tenant.domain}"\n'
        text += "".join(
            f'{key} = "{value}"\n'
            for key, value in (("ipv4", tenant.ipv4), ("ipv6", tenant.ipv6))
            if value
        )
        text += f'uid = {uid}\ngid = {uid}\nhome = "{home_of(tmp, tenant)}"\nusers = ["alice"]\n'
    return text


def home_of(tmp: Path, tenant: DemoTenant) -> Path:
    return tmp / "tenants" / tenant.domain


def outcome(verdict: dict[str, Any]) -> dict[str, Any]:
    """What the receiver did with one message: its Received clause, or its refusal."""
    if verdict["accepted"]:
        return {"received": verdict["received"], "verified": verdict["verified"]}
    return {"refused": verdict["reason"], "verified": verdict["verified"]}


def tenant_report(
    tenant: DemoTenant, naive: dict[str, Any], sent: dict[str, Any]
) -> dict[str, Any]:
    """One tenant's line of the report; `clean` means the receiver saw exactly the tenant."""
    literals = {f"[{address_literal(a)}]" for a in tenant.addresses}
    # The receiver verified the tenant's own name for one of the tenant's own addresses.
    clean = any(
        sent.get("received") == f"from {tenant.domain} ({tenant.domain} {lit})" for lit in literals
    )
    return {
        "domain": tenant.domain,
        "addresses": list(tenant.addresses),
        "naive": outcome(naive),
        "nsmail": {**outcome(sent), "clean": clean},
    }


def _cell(result: dict[str, Any]) -> str:
    return result["received"] if "received" in result else f"refused: {result['refused']}"


def render_comparison(tenants: Sequence[dict[str, Any]], width: int = TABLE_WIDTH) -> str:
    """The side-by-side table; cells that do not fit their column wrap onto more lines."""
    head = ("TENANT", f"THE USUAL WAY: from {HOST_NAME}'s address", "WITH NSMAIL")
    rows = [(t["domain"], _cell(t["naive"]), _cell(t["nsmail"])) for t in tenants]
    first = max(len(r[0]) for r in [head, *rows])
    third = max(len(r[2]) for r in [head, *rows])
    second = min(max(len(r[1]) for r in [head, *rows]), width - first - third - 4)
    lines = []
    for row in [head, *rows]:
        widths = (first, second, third)
        cells = [textwrap.wrap(c, w) or [""] for c, w in zip(row, widths, strict=True)]
        for parts in itertools.zip_longest(*cells, fillvalue=""):
            padded = (p.ljust(w) for p, w in zip(parts, widths, strict=True))
            lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def render(report: dict[str, Any], status_table: str) -> str:
    """What a person reads at the end of the demo."""
    policy = (
        "Policy (--strict): refuse a HELO that is not that name."
        if report["strict"]
        else "Policy: accept all (--strict refuses a HELO that is not that name)."
    )
    return "\n".join(
        [
            f"How {MX_NAME} saw each message: 'from HELO (name [address])' in the Received header",
            "it wrote, the name being the client's forward-confirmed reverse DNS name.",
            policy,
            "",
            render_comparison(report["tenants"]),
            "",
            f"The usual way, every tenant connects from {HOST_V4}, whose name is {HOST_NAME}:",
            "its HELO cannot match. With nsmail each tenant connects from its own address,",
            "whose name is the tenant's own.",
            "",
            "nsmail status:",
            status_table,
        ]
    )


# --- the record of what exists ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proc:
    """A process the demo started, known by pid and start time (pids get reused)."""

    role: str
    pid: int
    start: int


@dataclass(frozen=True, slots=True)
class State:
    """Everything a demo made; persisted so a later run or `--down` can remove it."""

    owner: Proc
    tmp: str | None = None
    config: str | None = None
    kept: bool = False
    processes: tuple[Proc, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> State:
        data = json.loads(text)
        procs = tuple(Proc(**p) for p in data.pop("processes"))
        return cls(**{**data, "owner": Proc(**data["owner"]), "processes": procs})


def _start_time(pid: int) -> int | None:
    """The start time of a live (not zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields count from its last ")".
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in "ZX" else int(fields[19])


def _alive(proc: Proc, child: subprocess.Popen[bytes] | None = None) -> bool:
    if proc.pid <= 0:
        return False
    if child is not None and child.poll() is not None:  # our own child, now reaped
        return False
    return _start_time(proc.pid) == proc.start


def _save(state: State) -> None:
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    part = STATE_FILE.with_suffix(".part")
    part.write_text(state.to_json())
    part.replace(STATE_FILE)


def _load() -> State | None:
    try:
        return State.from_json(STATE_FILE.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        # Unreadable: nothing in it can be trusted, but the lab namespaces are still ours.
        return State(owner=Proc("unknown", 0, 0))


def _claim(owner: Proc) -> None:
    """Become the one demo of this machine, or say why not."""
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    while True:
        try:
            fd = os.open(STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(State(owner=owner).to_json())
            return
        except FileExistsError:
            pass
        old = _load()
        if old is None:
            continue
        if old.kept:
            raise DemoError("a kept demo is up; take it down first with `nsmail demo --down`")
        if _alive(old.owner):
            raise DemoError(f"another nsmail demo is running (pid {old.owner.pid})")
        progress("removing what an interrupted demo left…")
        take_down(old)


# --- taking it down ----------------------------------------------------------------------


def _lab_namespaces() -> list[Path]:
    try:
        names = os.listdir(netns.NETNS_DIR)
    except FileNotFoundError:
        return []
    ours = {LAB_HOST.name, LAB_NET.name}
    return [netns.NETNS_DIR / n for n in names if n in ours or n.startswith(PREFIX + "-")]


def _stop(proc: Proc, grace: float, child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, and wait until it is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _alive(proc, child):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + wait
        while _alive(proc, child) and time.monotonic() < deadline:
            time.sleep(0.02)


def _kill_inside(namespaces: list[Path]) -> None:
    """SIGKILL every process whose network namespace is one of `namespaces`."""
    inodes = set()
    for path in namespaces:
        with contextlib.suppress(OSError):
            st = path.stat()
            inodes.add((st.st_dev, st.st_ino))
    deadline = time.monotonic() + 5.0
    while inodes and time.monotonic() < deadline:
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
                pid = int(entry)
                if (st.st_dev, st.st_ino) in inodes and pid != os.getpid() and _start_time(pid):
                    found = True
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        if not found:
            return
        time.sleep(0.02)


def take_down(state: State, children: Mapping[int, subprocess.Popen[bytes]] | None = None) -> None:
    """Remove everything `state` records, and every lab namespace; safe to repeat.

    `children` are the recorded processes that are this process's own children.
    """
    children = children or {}
    supervisors = [p for p in state.processes if p.role == "supervisor"]
    for proc in supervisors:  # it removes its tenants' namespaces itself
        _stop(proc, SUPERVISOR_GRACE, children.get(proc.pid))
    for proc in state.processes:
        _stop(proc, SERVER_GRACE, children.get(proc.pid))
    namespaces = _lab_namespaces()
    _kill_inside(namespaces)
    for path in namespaces:
        netns.remove_namespace(path)
    if state.tmp and Path(state.tmp).name.startswith(TEMP_PREFIX):
        shutil.rmtree(state.tmp, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)


def down() -> int:
    state = _load()
    if state is None and not _lab_namespaces():
        progress("no demo is up")
        return 0
    take_down(state or State(owner=Proc("unknown", 0, 0)))
    progress("the demo lab is down")
    return 0


# --- building it ---------------------------------------------------------------------------


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _checkpoint(stage: str) -> None:
    if os.environ.get(FAIL_AT_ENV) == stage:
        raise DemoError(f"failing after {stage}, as {FAIL_AT_ENV} asks")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold signals back while a process is started and recorded, so none goes unrecorded."""
    signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT)


def _child_setup(namespace: Path) -> None:
    # In the forked child: the parent's blocked signals would otherwise stay blocked.
    netns.enter(namespace)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT)


def _free_uids(count: int) -> list[int]:
    """Ids that are neither a user's nor a group's on this machine."""
    found: list[int] = []
    for uid in itertools.count(FIRST_UID):
        with contextlib.suppress(KeyError):
            pwd.getpwuid(uid)
            continue
        with contextlib.suppress(KeyError):
            grp.getgrgid(uid)
            continue
        found.append(uid)
        if len(found) == count:
            return found
    raise AssertionError("unreachable")


class Demo:
    """One run: builds the lab, sends, reports; `state` always says what exists."""

    def __init__(self, state: State, strict: bool) -> None:
        self.state = state
        self.strict = strict
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        with _signals_deferred():
            tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=TEMP_PARENT))
            self.update(tmp=str(tmp))
        # World-traversable: nsmail-sendmail runs as each tenant and reads the config.
        tmp.chmod(0o755)
        self.tmp = tmp
        self.config = tmp / "etc" / "nsmail.toml"
        self.maildir = tmp / "mx"
        self.nsmail = Path(sys.executable).with_name("nsmail")
        self.uids = _free_uids(len(TENANTS))

    def update(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)
        _save(self.state)

    def _spawn(
        self, role: str, argv: list[str], namespace: Path, log: TextIO, **kw: Any
    ) -> subprocess.Popen[bytes]:
        with _signals_deferred():
            child = subprocess.Popen(
                argv,
                preexec_fn=functools.partial(_child_setup, namespace),
                start_new_session=True,  # a Ctrl-C at the terminal reaches only the demo
                cwd="/",
                stderr=log,
                **kw,
            )
            self.children[child.pid] = child
            start = _start_time(child.pid)
            self.update(processes=(*self.state.processes, Proc(role, child.pid, start or 0)))
        return child

    # -- the network

    def build_network(self) -> None:
        netns.share_netns_dir()
        with netns.create_namespace(LAB_HOST) as host, netns.create_namespace(LAB_NET) as net:
            _enable_forwarding(LAB_HOST)
            host.link("set", index=netns.LOOPBACK_INDEX, state="up")
            net.link("set", index=netns.LOOPBACK_INDEX, state="up")
            fd = os.open(LAB_NET, os.O_RDONLY | os.O_CLOEXEC)
            try:
                host.link("add", ifname=UPLINK, kind="veth", peer={"ifname": PEER, "net_ns_fd": fd})
            finally:
                os.close(fd)
            host.link("add", ifname=BRIDGE, kind="bridge")
            _addresses(host, UPLINK, (HOST_V4, 24), (HOST_V6, 64), (LINK_LOCAL_HOST, 64))
            _addresses(host, BRIDGE, (BRIDGE_V4, 24), (BRIDGE_V6, 64), (LINK_LOCAL_HOST, 64))
            _addresses(net, PEER, *NET_ADDRESSES)
            # The tenants' addresses are reached through the hosting machine.
            net.route("add", dst="198.51.100.0/24", gateway=HOST_V4)
            net.route("add", dst="2001:db8:51::/64", gateway=HOST_V6)

    # -- the servers of "the internet"

    def start_servers(self) -> None:
        records = self.tmp / "records.json"
        records.write_text(json.dumps(dns_records(TENANTS)))
        dns_argv = ["-m", "nsmail.lab.dnsserver", "--records", str(records)]
        dns_argv += ["--listen", f"{DNS_V4}:53", "--listen", f"[{DNS_V6}]:53"]
        mx_argv = ["-m", "nsmail.lab.receiver", "--maildir", str(self.maildir), "--dns", DNS_V4]
        mx_argv += ["--listen", f"{MX_V4}:25", "--listen", f"[{MX_V6}]:25"]
        mx_argv += ["--hostname", MX_NAME] + (["--helo-must-match"] if self.strict else [])
        started = []
        for role, argv in (("dns", dns_argv), ("mx", mx_argv)):
            log_path = self.tmp / f"{role}.log"
            with log_path.open("w") as log:
                proc = self._spawn(
                    role, [sys.executable, *argv], LAB_NET, log, stdout=subprocess.PIPE
                )
            started.append((role, proc, log_path))
        for role, proc, log_path in started:
            _wait_ready(role, proc, log_path)

    # -- the hosting machine

    def start_supervisor(self) -> None:
        self.config.parent.mkdir()
        for tenant, uid in zip(TENANTS, self.uids, strict=True):
            home = home_of(self.tmp, tenant)
            home.mkdir(parents=True)
            os.chown(home, uid, uid)
            home.chmod(0o700)
        self.config.write_text(config_text(self.tmp, TENANTS, self.uids))
        self.update(config=str(self.config))
        notify_path = self.tmp / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.bind(str(notify_path))
            log_path = self.tmp / "supervisor.log"
            env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
            argv = [str(self.nsmail), "--config", str(self.config), "supervise"]
            with log_path.open("w") as log:
                proc = self._spawn("supervisor", argv, LAB_HOST, log, stdout=log, env=env)
            _wait_notify(notify, proc, log_path)
        notify_path.unlink()

    # -- mail

    def send(self) -> None:
        sendmail = self.nsmail.with_name("nsmail-sendmail")
        for tenant, uid in zip(TENANTS, self.uids, strict=True):
            sender = f"alice@{tenant.domain}"
            message = _message(sender, NSMAIL_RCPT, f"{tenant.domain}, sent by nsmail")
            result = subprocess.run(
                [str(sendmail), "-i", "-f", sender, NSMAIL_RCPT],
                input=message,
                user=uid,
                group=uid,
                extra_groups=[],
                env={"NSMAIL_CONFIG": str(self.config), "PATH": "/usr/bin:/bin"},
                cwd="/",
                capture_output=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                error = result.stderr.decode(errors="replace").strip()
                raise DemoError(f"nsmail-sendmail as {tenant.domain} failed: {error}")
        for tenant in TENANTS:
            self._send_naive(tenant)

    def _send_naive(self, tenant: DemoTenant) -> None:
        """Send as a hosting machine's MTA does: its own address, the tenant's name in EHLO."""
        sender = f"alice@{tenant.domain}"
        message = _message(sender, NAIVE_RCPT, f"{tenant.domain}, sent the usual way")
        try:
            # A socket stays in the namespace it was made in: only the connect must be inside.
            with netns.inside(LAB_HOST):
                smtp = smtplib.SMTP(
                    MX_V4,
                    25,
                    local_hostname=tenant.domain,
                    timeout=10,
                    source_address=(HOST_V4, 0),
                )
            with smtp:
                smtp.sendmail(sender, [NAIVE_RCPT], message)
        except smtplib.SMTPRecipientsRefused:
            pass  # the refusal is the receiver's verdict, and it is recorded
        except (smtplib.SMTPException, OSError) as e:
            raise DemoError(f"the usual-way send for {tenant.domain} failed: {e}") from e

    def verdicts(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The receiver's verdicts by (tenant, NSMAIL_RCPT or NAIVE_RCPT); waits for all."""
        deadline = time.monotonic() + DELIVERY_WAIT
        wanted = {(t.domain, r) for t in TENANTS for r in (NSMAIL_RCPT, NAIVE_RCPT)}
        while True:
            found = _read_verdicts(self.maildir / VERDICTS)
            missing = wanted - found.keys()
            if not missing:
                return found
            if time.monotonic() > deadline:
                late = ", ".join(sorted(d for d, _ in missing))
                raise DemoError(f"nothing reached {MX_NAME} from {late} in {DELIVERY_WAIT:.0f} s")
            time.sleep(0.1)

    def status(self, as_json: bool) -> str:
        argv = [str(self.nsmail), "--config", str(self.config), "status"]
        result = subprocess.run(
            argv + (["--json"] if as_json else []),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"nsmail status failed: {result.stderr.strip()}")
        return result.stdout.rstrip("\n")


def _enable_forwarding(namespace: Path) -> None:
    # /proc/sys/net shows the namespace of the thread that opens it.
    with netns.inside(namespace):
        for knob in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
            Path("/proc/sys", knob).write_text("1\n")


def _addresses(ipr: IPRoute, ifname: str, *addresses: tuple[str, int]) -> None:
    index = int(ipr.link("get", ifname=ifname)[0]["index"])
    for address, prefixlen in addresses:
        # No duplicate address detection: nobody else is on these links.
        flags = rtnetlink.IFA_F_NODAD if ":" in address else 0
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=flags)
    ipr.link("set", index=index, state="up", **netns.NO_LINK_LOCAL)


def _message(sender: str, recipient: str, subject: str) -> bytes:
    return f"From: {sender}\nTo: {recipient}\nSubject: {subject}\n\nHello from the demo.\n".encode()


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def _wait_ready(role: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for the `ready` line a lab server prints once it listens."""
    assert proc.stdout is not None
    with proc.stdout, selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_WAIT
        seen = b""
        while b"ready\n" not in seen:
            if not selector.select(max(0.0, deadline - time.monotonic())):
                raise DemoError(f"the lab {role} server was not ready in {READY_WAIT:.0f} s")
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                raise DemoError(f"the lab {role} server failed: {_last_line(log)}")
            seen += chunk


def _wait_notify(notify: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for the supervisor's READY=1, as systemd would."""
    deadline = time.monotonic() + READY_WAIT
    notify.settimeout(0.2)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the supervisor exited: {_last_line(log)}")
        with contextlib.suppress(TimeoutError):
            if "READY=1" in notify.recv(4096).decode(errors="replace").splitlines():
                return
    raise DemoError(f"the supervisor was not ready in {READY_WAIT:.0f} s: {_last_line(log)}")


def _read_verdicts(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # still being written
            verdict = json.loads(line)
            domain = verdict["from"].rpartition("@")[2]
            for recipient in verdict["to"]:
                found[(domain, recipient)] = verdict
    return found


# --- the command -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsmail demo",
        description="Build a throwaway lab in network namespaces and show what a receiving "
        "MTA sees of three tenants' mail, sent the usual way and sent by nsmail (root).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="the receiver refuses a HELO that is not the client's verified name",
    )
    parser.add_argument("--keep", action="store_true", help="leave the lab up to explore it")
    parser.add_argument("--down", action="store_true", help="take down a kept lab, and exit")
    return parser


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("nsmail demo: must run as root (it builds network namespaces)", file=sys.stderr)
        return EX_NOPERM
    if args.down:
        return down()
    started = time.monotonic()
    for signum in CAUGHT:
        signal.signal(signum, _raise_interrupted)
    me = Proc("demo", os.getpid(), _start_time(os.getpid()) or 0)
    claimed = keep = False
    demo: Demo | None = None
    try:
        with _signals_deferred():
            _claim(me)
            claimed = True
        demo = Demo(State(owner=me), args.strict)
        output = _run(demo, args.json)
        if args.keep:
            demo.update(kept=True)
            keep = True
        print(output, flush=True)
        if keep:
            print(_explore(demo), file=sys.stderr if args.json else sys.stdout)
    except DemoError as e:
        print(f"nsmail demo: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"nsmail demo: interrupted by {e}", file=sys.stderr)
        return 128 + e.signum
    finally:
        for signum in CAUGHT:
            signal.signal(signum, signal.SIG_IGN)  # the cleanup must run to its end
        if claimed and not keep:
            progress("taking the lab down…")
            take_down(_load() or State(owner=me), demo.children if demo else None)
    progress(f"done in {time.monotonic() - started:.1f} s")
    return 0


def _run(demo: Demo, as_json: bool) -> str:
    progress(f"creating namespaces… ({LAB_HOST.name}, {LAB_NET.name}; tmp {demo.tmp})")
    demo.build_network()
    _checkpoint("namespaces")
    progress("starting DNS and receiving MTA…")
    demo.start_servers()
    _checkpoint("servers")
    progress(f"starting the nsmail supervisor with {len(TENANTS)} tenants…")
    demo.start_supervisor()
    _checkpoint("supervisor")
    progress("sending…")
    demo.send()
    verdicts = demo.verdicts()
    _checkpoint("sending")
    tenants = [
        tenant_report(t, verdicts[(t.domain, NAIVE_RCPT)], verdicts[(t.domain, NSMAIL_RCPT)])
        for t in TENANTS
    ]
    report = {"strict": demo.strict, "tenants": tenants}
    if as_json:
        report["status"] = json.loads(demo.status(as_json=True))["workers"]
        return json.dumps(report, indent=2)
    return "\n" + render(report, demo.status(as_json=False))


def _explore(demo: Demo) -> str:
    tenant = TENANTS[0]
    commented = [
        (
            f"nsenter --net={netns.NETNS_DIR}/{PREFIX}-{tenant.domain} ip address",
            f"{tenant.domain}'s own network",
        ),
        (f"ls {home_of(demo.tmp, tenant)}/var/spool/nsmail", f"{tenant.domain}'s queue"),
        (f"cat {demo.maildir}/{VERDICTS}", f"what {MX_NAME} decided"),
    ]
    column = max(len(command) for command, _ in commented) + 2
    return "\n".join(
        [
            "",
            "The lab stays up. To look around, as root:",
            f"  export NSMAIL_CONFIG={demo.config} PATH={demo.nsmail.parent}:$PATH",
            "  nsmail status",
            *(f"  {command.ljust(column)}# {why}" for command, why in commented),
            f"  echo 'Subject: hi' | nsmail-sendmail --tenant {tenant.domain} -i {NAIVE_RCPT}",
            "Take it down with: nsmail demo --down",
        ]
    )
