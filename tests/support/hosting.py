"""A hosting machine under test: tenant homes, a config, and the real `nsmail supervise`.

The supervisor runs as the console script `nsmail`, in the lab's host namespace (never in
the machine's own), started with `NOTIFY_SOCKET` pointing at a socket of the test so
readiness is what systemd would see. Tenant namespaces it makes are named
`{lab.prefix}-{domain}`, so the lab's teardown sweeps them even after a failure. The
host's aliases file and mail spool (/var/mail) are the lab's own too, never the machine's.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from lab import (
    BRIDGE,
    BRIDGE_V4,
    BRIDGE_V6,
    DNS_V4,
    HOST_NAME,
    TENANT_SUBNET4,
    TENANT_SUBNET6,
    Lab,
    lab_records,
)
from lab import forward_and_reverse as fr
from mailboxes import mailbox, mbox

from nsmail.core.config import SmtpTimeouts
from nsmail.core.queuefile import Envelope, encode
from nsmail.submit import maildrop
from nsmail.tenant.spool import SPOOL_IN_HOME, Spool, new_queue_id

NSMAIL = str(Path(sys.executable).with_name("nsmail"))
SENDMAIL = str(Path(sys.executable).with_name("nsmail-sendmail"))


@dataclass(frozen=True)
class TenantSpec:
    domain: str
    ipv4: str | None
    ipv6: str | None
    extra: str = ""  # more TOML lines for this tenant's table
    users: tuple[str, ...] = ("alice", "bob")  # none: local_delivery is "mx"


DUAL = TenantSpec("bcd.test", "198.51.100.70", "2001:db8:51::70")
V4_ONLY = TenantSpec("cde.test", "198.51.100.71", None)
V6_ONLY = TenantSpec("def.test", None, "2001:db8:51::72")
THREE = (DUAL, V4_ONLY, V6_ONLY)


def dns_records(tenants: tuple[TenantSpec, ...] = THREE) -> list[tuple[str, str, str]]:
    """Forward and reverse DNS for the host, the tenants and the receiving MX."""
    records = [*lab_records(), ("other.test", "MX", "10 mx.test")]
    for t in tenants:
        for address in (t.ipv4, t.ipv6):
            if address:
                records += fr(t.domain, address)
    return records


class Hosting:
    """Tenant homes and configuration for one lab, and the supervisor process."""

    def __init__(self, lab: Lab, *, mode: str = "bridge", resolvers: tuple[str, ...] = (DNS_V4,)):
        self.lab = lab
        self.mode = mode
        self.resolvers = resolvers
        self.root = lab.tempdir("hosting")
        self.etc = self.root / "etc"
        (self.etc / "tenants.d").mkdir(parents=True)
        self.run_dir = self.root / "run"
        # Distinct per run so concurrent runs never share a tenant uid.
        self.uid_base = 40000 + int(secrets.token_hex(2), 16) % 2000 * 10
        self.uids: dict[str, int] = {}
        self.proc: subprocess.Popen[Any] | None = None
        self._notify: socket.socket | None = None
        self.log_path = self.root / "supervisor.log"
        self._log = self.log_path.open("ab")
        lab.defer(self.close)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._notify is not None:
            self._notify.close()
        self._log.close()

    @property
    def config_path(self) -> Path:
        return self.etc / "nsmail.toml"

    @property
    def host_spool(self) -> Path:
        return self.root / "hostspool"

    @property
    def aliases(self) -> Path:
        """The host's aliases file (`[host] aliases`), absent until a test writes it."""
        return self.etc / "aliases"

    @property
    def mail_spool(self) -> Path:
        """The host's /var/mail (`[host] mail_spool`), drwxrwsr-x root:mail as Debian's."""
        return self.root / "mail"

    def mbox(self, user: str) -> list[EmailMessage]:
        """The messages in a host user's mailbox, read as mail(1) reads /var/mail."""
        return mbox(self.mail_spool / user)

    def home(self, domain: str) -> Path:
        return self.root / "tenants" / domain

    def uid(self, domain: str) -> int:
        return self.uids.setdefault(domain, self.uid_base + len(self.uids))

    def proc_uid(self, pid: int) -> int:
        """The real uid of a process (its /proc entry is root's: workers are not dumpable)."""
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:"))
        return int(uids.split()[1])

    def namespace(self, domain: str) -> str:
        return f"{self.lab.prefix}-{domain}"

    def write_config(
        self, tenants: tuple[TenantSpec, ...], host_extra: str = "", **delivery: Any
    ) -> Path:
        network = (
            f'mode = "bridge"\nbridge = "{BRIDGE}"\n'
            f'gateway4 = "{BRIDGE_V4}"\ngateway6 = "{BRIDGE_V6}"\n'
            f'subnet4 = "{TENANT_SUBNET4}"\nsubnet6 = "{TENANT_SUBNET6}"\n'
            if self.mode == "bridge"
            else 'mode = "routed"\n'
        )
        # `timeout` stands for every SMTP stage too, unless a test names one: a test's
        # receivers stall for seconds, not the minutes of RFC 5321 4.5.3.2.
        timeout = delivery.get("timeout", 5)
        stages = {f"smtp_{stage}_timeout": timeout for stage in SmtpTimeouts.__dataclass_fields__}
        settings = {"scan_interval": 2, "timeout": 5, **stages, **delivery}
        self.mail_spool.mkdir(exist_ok=True)
        os.chown(self.mail_spool, 0, grp.getgrnam("mail").gr_gid)
        self.mail_spool.chmod(0o2775)
        text = (
            f'[host]\nname = "{HOST_NAME}"\nresolvers = {json.dumps(list(self.resolvers))}\n'
            f'run_dir = "{self.run_dir}"\nspool = "{self.host_spool}"\n'
            f'aliases = "{self.aliases}"\nmail_spool = "{self.mail_spool}"\n{host_extra}'
            f'[network]\n{network}prefix = "{self.lab.prefix}"\n'
            "[delivery]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        )
        for t in tenants:
            text += self._tenant_toml(t)
        self.config_path.write_text(text)
        return self.config_path

    def _tenant_toml(self, t: TenantSpec) -> str:
        home = self.home(t.domain)
        uid = self.uid(t.domain)
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, uid, uid)
        home.chmod(0o700)
        lines = [f'[[tenant]]\ndomain = "{t.domain}"\nuid = {uid}\ngid = {uid}\nhome = "{home}"']
        lines += [f'ipv4 = "{t.ipv4}"'] if t.ipv4 else []
        lines += [f'ipv6 = "{t.ipv6}"'] if t.ipv6 else []
        lines += [f"users = {json.dumps(list(t.users))}"] if t.users else []
        lines += t.extra.splitlines()
        return "\n".join(lines) + "\n"

    # -- the supervisor ------------------------------------------------------------------

    def start(self, timeout: float = 30.0, ca_file: Path | None = None) -> None:
        """Start `nsmail supervise` in the lab's host namespace and wait for READY=1.
        `ca_file`: the CA store its workers trust instead of the machine's (OpenSSL's
        SSL_CERT_FILE), for a lab CA."""
        notify_path = self.root / "notify"
        if self._notify is None:
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1"}
        if ca_file is not None:
            env["SSL_CERT_FILE"] = str(ca_file)
        self.proc = self.lab.popen(
            self.lab.host,
            [NSMAIL, "--config", str(self.config_path), "supervise"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_notify("READY=1", timeout)

    def wait_notify(self, line: str, timeout: float = 30.0) -> None:
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._notify.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self._notify.recv(4096).decode()
            except TimeoutError:
                break
            if line in message.splitlines():
                return
        raise AssertionError(f"no {line} from the supervisor; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def nsmail(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NSMAIL, "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """The tenants' workers by domain (the host's own worker: `host_status`)."""
        return {d: w for d, w in self._workers().items() if w["role"] == "tenant"}

    def host_status(self) -> dict[str, Any]:
        (host,) = [w for w in self._workers().values() if w["role"] == "host"]
        return host

    def drain_notify(self) -> None:
        """Read what the supervisor told systemd since, as systemd would."""
        if self._notify is None:
            return
        self._notify.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self._notify.recv(4096):
                pass
        self._notify.setblocking(True)

    def _workers(self) -> dict[str, dict[str, Any]]:
        self.drain_notify()
        result = self.nsmail("status", "--json")
        assert result.returncode == 0, result.stderr
        return {w["domain"]: w for w in json.loads(result.stdout)["workers"]}

    def wait_status(self, predicate: Any, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched: {status}\n{self.log()}")
            time.sleep(0.1)

    # -- mail --------------------------------------------------------------------------

    def sendmail(
        self, domain: str | None, args: list[str], message: bytes, uid: int | None = None
    ) -> None:
        """Run the real nsmail-sendmail as a tenant's user, or as `uid`."""
        uid = self.uid(domain) if domain else uid
        result = subprocess.run(
            [SENDMAIL, *args],
            input=message,
            user=uid,
            group=uid,
            extra_groups=[],
            env={"NSMAIL_CONFIG": str(self.config_path), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr

    def maildir(self, domain: str, user: str) -> list[EmailMessage]:
        """The messages delivered to a local user of a tenant."""
        return mailbox(self.home(domain), user)

    def enqueue(self, domain: str, sender: str, recipients: list[str], body: bytes) -> str:
        """Drop a message into a tenant's maildrop as its own uid, as its sendmail would."""
        (queue_id,) = self.enqueue_many(domain, sender, recipients, [body])
        return queue_id

    def enqueue_many(
        self, domain: str, sender: str, recipients: list[str], bodies: list[bytes]
    ) -> list[str]:
        """`enqueue` for many messages from one process (a fork each takes long)."""
        uid = self.uid(domain)
        spool = Spool(self.home(domain) / SPOOL_IN_HOME)
        now = time.time()
        queue_ids = [new_queue_id(now) for _ in bodies]
        envelope = Envelope(sender, tuple(recipients), arrival=now, submitter="alice")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                spool.create()
                for queue_id, body in zip(queue_ids, bodies, strict=True):
                    maildrop.drop(str(spool.root), queue_id, [encode(envelope, body)], 0o600)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "enqueue failed"
        return queue_ids
