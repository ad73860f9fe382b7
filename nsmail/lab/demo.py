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

The lab is `nsmail.lab.topology`'s, with the prefix `demo`; what goes into it and how the
verdicts are shown is `nsmail.lab.scenario`. Everything it makes is a namespace named
`demohost`, `demonet` or `demo-*` (its links live inside them), a process, or a file in
one temporary directory; each is recorded in the lab's inventory,
/run/nsmail-demo/state.json, before or as it is made. The end of the run (also on Ctrl-C,
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
import itertools
import json
import os
import pwd
import selectors
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from nsmail.core.exitcodes import EX_NOPERM
from nsmail.lab import topology
from nsmail.lab.receiver import VERDICTS
from nsmail.lab.scenario import (
    NAIVE_RCPT,
    NAMES,
    NSMAIL_RCPT,
    TENANTS,
    DemoTenant,
    config_path,
    config_text,
    dns_records,
    home_of,
    render,
    tenant_report,
)
from nsmail.lab.topology import (
    DNS_V4,
    DNS_V6,
    HOST_V4,
    MX_NAME,
    MX_V4,
    MX_V6,
    NETNS_DIR,
    Inventory,
    Proc,
)
from nsmail.root import setns

LAB_HOST = NETNS_DIR / NAMES.host
LAB_NET = NETNS_DIR / NAMES.net
STATE_DIR = Path("/run/nsmail-demo")
STATE_FILE = STATE_DIR / "state.json"
TEMP_PREFIX = "nsmail-demo-"
TEMP_PARENT = Path("/run")  # root's and 0755: nsmail refuses tenant homes under /tmp
FIRST_UID = 61000  # above Debian's dynamic range (1000-59999), below nobody's 65534
FAIL_AT_ENV = "NSMAIL_DEMO_FAIL_AT"

READY_WAIT = 20.0
DELIVERY_WAIT = 20.0
SERVER_GRACE = 3.0
GRACES = {
    # It gives each worker 10 s, then waits up to 10 s for its tenants' namespaces.
    "supervisor": 25.0,
    "dns": SERVER_GRACE,
    "mx": SERVER_GRACE,
}
CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
UNKNOWN = Proc("unknown", 0, 0)


class DemoError(Exception):
    """The demo cannot go on; the message is the one line shown to the user."""


class Interrupted(Exception):
    """A signal asked the demo to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- the record of what exists ---------------------------------------------------------


def _save(inventory: Inventory) -> None:
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    topology.save(inventory, STATE_FILE)


def _load() -> Inventory | None:
    try:
        inventory = topology.load(STATE_FILE)
    except ValueError:
        # Unreadable: nothing in it can be trusted, but the lab namespaces are still ours.
        return Inventory(NAMES, UNKNOWN)
    if inventory is None:
        return None
    # The demo's own namespaces and temporary directory only, whatever the file says.
    tmp = inventory.tmp
    if tmp is not None and not Path(tmp).name.startswith(TEMP_PREFIX):
        tmp = None
    return replace(inventory, names=NAMES, tmp=tmp)


def _claim(owner: Proc) -> None:
    """Become the one demo of this machine, or say why not."""
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    while True:
        try:
            fd = os.open(STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(Inventory(NAMES, owner).to_json())
            return
        except FileExistsError:
            pass
        old = _load()
        if old is None:
            continue
        if old.kept:
            raise DemoError("a kept demo is up; take it down first with `nsmail demo --down`")
        if old.owner.alive():
            raise DemoError(f"another nsmail demo is running (pid {old.owner.pid})")
        progress("removing what an interrupted demo left…")
        take_down(old)


# --- taking it down ----------------------------------------------------------------------


def take_down(
    inventory: Inventory, children: Mapping[int, subprocess.Popen[bytes]] | None = None
) -> None:
    """Remove everything `inventory` records, and every lab namespace; safe to repeat.

    `children` are the recorded processes that are this process's own children. The
    supervisor is stopped first and gently: it removes its tenants' namespaces itself.
    """
    for error in topology.take_down(inventory, children, GRACES):
        progress(f"nsmail demo: {error}")
    STATE_FILE.unlink(missing_ok=True)


def down() -> int:
    state = _load()
    if state is None and not topology.owned(NAMES):
        progress("no demo is up")
        return 0
    take_down(state or Inventory(NAMES, UNKNOWN))
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
    setns.enter(namespace)
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

    def __init__(self, state: Inventory, strict: bool) -> None:
        self.state = state
        self.strict = strict
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        with _signals_deferred():
            tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=TEMP_PARENT))
            self.update(tmp=str(tmp))
        # World-traversable: nsmail-sendmail runs as each tenant and reads the config.
        tmp.chmod(0o755)
        self.tmp = tmp
        self.config = config_path(tmp)
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
            self.update(processes=(*self.state.processes, Proc.of(role, child.pid)))
        return child

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
            with setns.inside(LAB_HOST):
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
    me = Proc.of("demo", os.getpid())
    claimed = keep = False
    demo: Demo | None = None
    try:
        with _signals_deferred():
            _claim(me)
            claimed = True
        demo = Demo(Inventory(NAMES, me), args.strict)
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
            take_down(_load() or Inventory(NAMES, me), demo.children if demo else None)
    progress(f"done in {time.monotonic() - started:.1f} s")
    return 0


def _run(demo: Demo, as_json: bool) -> str:
    progress(f"creating namespaces… ({LAB_HOST.name}, {LAB_NET.name}; tmp {demo.tmp})")
    try:
        topology.build(NAMES)
    except topology.PrefixTaken:
        # Made by no demo that recorded it (its inventory was removed): ours all the same.
        raise DemoError(f"{LAB_HOST.name} exists; it is removed now, run the demo again") from None
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
            f"nsenter --net={NETNS_DIR}/{NAMES.prefix}-{tenant.domain} ip address",
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
