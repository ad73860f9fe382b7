"""Isolation under attack: a tenant's user with a shell goes after the other tenants.

The attacker (`attacker.Attacker`) is cde.test's uid on the hosting machine, outside its
jail; bcd.test is the victim. Both are served by the real supervisor, with a real NSD and
a strict Postfix in the lab. What a jailed worker can reach is `test_jail_probes`'s part;
here the attacks come from outside the jail, and each test asserts the specific refusal.

Found weaknesses that are still open are strict xfails: they pass once fixed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from attacker import Attacker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hosting import DUAL, V4_ONLY, Hosting, dns_records
from lab import MX_V4, MX_V6, Lab, Nsd, Postfix
from procfs import cpu_seconds

from nsmail.core.queuefile import Envelope, encode
from nsmail.core.report import QUEUE_STATES, Report
from nsmail.core.report import encode as encode_report
from nsmail.tenant import inotify
from nsmail.tenant.spool import SPOOL_IN_HOME, STATES, TMP, new_queue_id

SENDMAIL = str(Path(sys.executable).with_name("nsmail-sendmail"))
NSMAIL = str(Path(sys.executable).with_name("nsmail"))
VICTIM = DUAL  # bcd.test: 198.51.100.70 and 2001:db8:51::70
RECIPIENT_LIMIT = 3
_libc = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike


@dataclass
class Site:
    lab: Lab
    hosting: Hosting
    postfix: Postfix
    attacker: Attacker
    victims_message: str  # a deferred message in the victim's queue

    @property
    def domain(self) -> str:
        return self.attacker.domain

    def spool(self, domain: str) -> Path:
        return self.hosting.home(domain) / SPOOL_IN_HOME

    def worker(self, domain: str) -> int:
        pid = self.hosting.wait_status(lambda s: s[domain]["pid"])[domain]["pid"]
        assert isinstance(pid, int)
        return pid

    def arrived(self, subject: str, timeout: float = 30) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.postfix.messages() if m["Subject"] == subject]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"{subject!r} never arrived\n{self.postfix.log()}"
            time.sleep(0.05)

    def never_arrived(self, subject: str) -> bool:
        return all(m["Subject"] != subject for m in self.postfix.messages())

    def logged(self, pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.hosting.log())):
            assert time.monotonic() < deadline, f"no {pattern!r} in\n{self.hosting.log()}"
            time.sleep(0.05)
        return found.group(0)

    def sendmail(self, args: list[str], message: bytes) -> subprocess.CompletedProcess[str]:
        return self.attacker.run([SENDMAIL, *args], stdin=message)

    def plant(self, state: str, envelope: Envelope, body: bytes, directory: Path) -> str:
        """Write a queue file of the attacker's own making into `directory`/`state`."""
        queue_id = new_queue_id(time.time())
        done = self.attacker.python(
            PLANT, directory / state, queue_id, encode(envelope, body).hex()
        )
        assert done == "ok", done
        return queue_id


PLANT = """
directory, queue_id, data = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
partial = os.path.join(directory, "." + queue_id)
with open(partial, "xb") as f:
    f.write(data)
os.rename(partial, os.path.join(directory, queue_id))
print(json.dumps("ok"))
"""


def received(message: EmailMessage) -> str:
    """The receiver's own (topmost) Received header, unfolded."""
    return " ".join(str(message["Received"]).split())


def signing_key(directory: Path) -> Path:
    directory.mkdir(mode=0o700)
    path = directory / "cde.test.s1.key"
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Lab() as lab:
        Nsd(lab, dns_records())
        postfix = Postfix(lab)
        hosting = Hosting(lab)
        key = signing_key(hosting.etc / "dkim")
        extra = f'recipient_limit = {RECIPIENT_LIMIT}\ndkim_selector = "s1"\ndkim_key = "{key}"'
        attacking = dataclasses.replace(V4_ONLY, extra=extra)
        hosting.write_config((VICTIM, attacking))
        hosting.start()
        domain = attacking.domain
        uid = hosting.uid(domain)
        attacker = Attacker(lab, domain, uid, uid, hosting.home(domain), hosting.config_path)
        victims = hosting.enqueue(
            VICTIM.domain, "alice@bcd.test", ["tempfail@rcpt.test"], b"Subject: v\r\n\r\nv\r\n"
        )
        hosting.wait_status(lambda s: (s[VICTIM.domain]["queue"] or {}).get("deferred") == 1)
        yield Site(lab, hosting, postfix, attacker, victims)


# -- 1. other tenants' files -----------------------------------------------------------


def test_another_tenants_queue_maildir_and_home_are_closed(site: Site) -> None:
    """Read, list, write into the victim's home, every queue state, its Maildir; replace
    a queued file of the victim's with one of the attacker's own."""
    home = site.hosting.home(VICTIM.domain)
    spool = site.spool(VICTIM.domain)
    inside = [spool, *(spool / s for s in (*STATES, TMP)), home / "mail" / "alice" / "new"]
    queued = spool / "deferred" / site.victims_message
    result = site.attacker.python(
        """
home, queued, own = sys.argv[1], sys.argv[2], sys.argv[3]
inside = json.loads(sys.argv[4])
open(own, "wb").close()
def create(d):
    os.close(os.open(os.path.join(d, "x"), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
print(json.dumps({
    "home": [outcome(lambda: os.listdir(home)), outcome(lambda: create(home))],
    "inside": {p: [outcome(lambda: os.listdir(p)), outcome(lambda: os.stat(p)),
                   outcome(lambda: create(p))] for p in inside},
    "read": outcome(lambda: open(queued, "rb")),
    "replace": outcome(lambda: os.rename(own, queued)),
    "link": outcome(lambda: os.link(own, queued + ".x")),
    "unlink": outcome(lambda: os.unlink(queued)),
}))
""",
        home,
        queued,
        site.attacker.home / "mine",
        json.dumps([str(p) for p in inside]),
    )
    # The home is 0700: nothing under it can even be looked up.
    assert result["home"] == ["EACCES", "EACCES"]
    assert result["inside"] == {str(p): ["EACCES"] * 3 for p in inside}
    assert (result["read"], result["replace"], result["link"], result["unlink"]) == (
        "EACCES",
        "EACCES",
        "EACCES",
        "EACCES",
    )
    assert queued.exists()


# -- 2. the supervisor and the other queues ---------------------------------------------


def test_status_and_other_queues_are_refused_own_queue_is_not(site: Site) -> None:
    """`nsmail status` (table and JSON), the control socket itself ("status" and
    "reload"), `nsmail queue` on the victim's queue and message; the attacker's own
    `nsmail queue list` still works."""
    nsmail = site.attacker.nsmail
    for args in (["status"], ["status", "--json"], ["status", VICTIM.domain]):
        refused = nsmail(*args)
        assert refused.returncode == 77, refused
        assert "permission denied" in refused.stderr
        assert "only root and the admin group may ask" in refused.stderr
        assert refused.stdout == ""
    control = site.hosting.run_dir / "control"
    direct = site.attacker.python(
        """
def ask(cmd):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sys.argv[1])
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\\n")
        print(s.recv(65536), file=sys.stderr)
print(json.dumps({cmd: outcome(lambda: ask(cmd)) for cmd in ("status", "reload")}))
""",
        control,
    )
    assert direct == {"status": "EACCES", "reload": "EACCES"}
    assert control.stat().st_mode & 0o777 == 0o600 and control.stat().st_uid == 0

    others = nsmail("queue", "list", "--tenant", VICTIM.domain)
    assert others.returncode == 77
    assert "you may act only on the queue of cde.test" in others.stderr
    for verb in ("show", "hold", "delete", "requeue"):
        touched = nsmail("queue", verb, site.victims_message)
        assert touched.returncode == 77, touched
        assert f"{site.victims_message}: not in your queue" in touched.stderr
    assert site.hosting.status()[VICTIM.domain]["queue"]["deferred"] == 1

    own = site.hosting.enqueue(site.domain, "alice@cde.test", ["tempfail@rcpt.test"], b"\r\n")
    site.hosting.wait_status(lambda s: s[site.domain]["queue"]["deferred"] >= 1)
    listed = nsmail("queue", "list")
    assert listed.returncode == 0, listed.stderr
    assert own in listed.stdout and site.victims_message not in listed.stdout
    # The tenants' list is the world-readable configuration (every sendmail reads it):
    # it tells the attacker nothing the file does not.
    assert nsmail("tenant", "list").returncode == 0


def test_nsmail_exec_is_root_only(site: Site) -> None:
    """`nsmail exec VICTIM -- COMMAND`: run something in the victim's namespace."""
    refused = site.attacker.nsmail("exec", VICTIM.domain, "--", "true")
    assert refused.returncode == 77
    assert refused.stderr == "nsmail: exec: only root may run commands as a tenant\n"


def test_root_only_commands_say_not_permitted(site: Site) -> None:
    """`nsmail flush`, `tenant add|remove`, `dkim keygen` on the victim, as the attacker."""
    home = str(site.attacker.home)
    uid = str(site.attacker.uid)
    add = ["tenant", "add", "evil.test", "--ipv4", "198.51.100.99", "--uid", uid, "--gid", uid]
    for args in (
        ["flush", VICTIM.domain],
        [*add, "--home", home],
        ["tenant", "remove", VICTIM.domain],
        ["dkim", "keygen", VICTIM.domain],
    ):
        refused = site.attacker.nsmail(*args)
        assert refused.returncode == 77, (args, refused)
        assert refused.stderr == f"nsmail {args[0]}: only root may do this\n"


# -- 3. namespaces -----------------------------------------------------------------------


SETNS = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def setns(path):
    fd = os.open(path, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns")
def bind(address, option=None, to=None):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as s:
        if option:  # IP_FREEBIND, IPV6_FREEBIND: unprivileged
            level = socket.IPPROTO_IPV6 if ":" in address else socket.IPPROTO_IP
            s.setsockopt(level, option, 1)
        s.bind((address, 0))
        if to:
            s.settimeout(2)
            try:
                s.connect((to, 25))
            except TimeoutError:
                raise OSError(errno.ETIMEDOUT, "no answer") from None
path, worker = sys.argv[1], sys.argv[2]
print(json.dumps({
    "open": outcome(lambda: os.close(os.open(path, os.O_RDONLY))),
    "setns": outcome(lambda: setns(path)),
    "worker's": outcome(lambda: setns(f"/proc/{worker}/ns/net")),
    "bind4": outcome(lambda: bind(sys.argv[3])),
    "bind6": outcome(lambda: bind(sys.argv[4])),
    "freebind4": outcome(lambda: bind(sys.argv[3], 15, sys.argv[5])),
    "freebind6": outcome(lambda: bind(sys.argv[4], 78, sys.argv[6])),
}))
"""


def test_the_victims_namespace_and_addresses_are_out_of_reach(site: Site) -> None:
    """setns into the victim's namespace (its /run/netns file and its worker's
    /proc/PID/ns/net), `ip netns exec`, `nsenter --net`, `unshare -n`, a namespace of
    one's own holding the victim's address, and binding that address on the host."""
    namespace = site.hosting.namespace(VICTIM.domain)
    path = f"/run/netns/{namespace}"
    worker = site.worker(VICTIM.domain)
    assert VICTIM.ipv4 and VICTIM.ipv6
    result = site.attacker.python(SETNS, path, worker, VICTIM.ipv4, VICTIM.ipv6, MX_V4, MX_V6)
    assert result == {
        "open": "ok",  # the file is readable, joining needs CAP_SYS_ADMIN
        "setns": "EPERM",
        "worker's": "EACCES",  # not dumpable: its /proc entries are root's
        "bind4": "EADDRNOTAVAIL",
        "bind6": "EADDRNOTAVAIL",
        # Bound anyway (IP_FREEBIND needs no privilege), but a packet made here with a
        # tenant's source goes nowhere: IPv4 finds no route from a foreign source, and
        # for IPv6 the host's policy rule for each tenant address refuses it.
        "freebind4": "ENETUNREACH",
        "freebind6": "EACCES",
    }
    ip = site.attacker.run(["ip", "netns", "exec", namespace, "true"])
    assert ip.returncode == 255
    assert f'setting the network namespace "{namespace}" failed: Operation not permitted' in (
        ip.stderr
    )
    nsenter = site.attacker.run(["nsenter", f"--net={path}", "true"])
    assert nsenter.returncode == 1
    assert "reassociate to namespace 'ns/net' failed: Operation not permitted" in nsenter.stderr
    unshare = site.attacker.run(["unshare", "-n", "true"])
    assert unshare.returncode == 1 and "Operation not permitted" in unshare.stderr
    # With a user namespace the attacker gets a network namespace of its own; the
    # victim's address in it is an address on an island without links.
    island = (
        f"ip addr add {VICTIM.ipv4}/32 dev lo && ip link set lo up && "
        f"{sys.executable} -c 'import socket; s = socket.socket(); "
        f's.bind(("{VICTIM.ipv4}", 0)); s.connect(("{MX_V4}", 25))\''
    )
    own = site.attacker.run(["unshare", "--user", "--map-root-user", "--net", "sh", "-c", island])
    assert own.returncode == 1
    assert "OSError: [Errno 101] Network is unreachable" in own.stderr


# -- 4. the attacker's own worker ---------------------------------------------------------


def test_its_own_worker_cannot_be_traced_read_or_entered(site: Site) -> None:
    """ptrace, /proc/PID/{fd,root,mem,environ,ns/net}, pidfd_getfd on the attacker's
    own worker (same uid): it is not dumpable, so it is root's to look at."""
    worker = site.worker(site.domain)
    result = site.attacker.python(
        """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
def ptrace():
    if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
def getfd():
    fd = libc.syscall(438, os.pidfd_open(pid), 3, 0)  # pidfd_getfd
    if fd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
result = {"ptrace": outcome(ptrace), "pidfd_getfd": outcome(getfd)}
for name in ("fd", "root", "cwd"):
    result[name] = outcome(lambda: os.listdir(f"/proc/{pid}/{name}"))
for name in ("mem", "environ", "ns/net"):
    result[name] = outcome(lambda: open(f"/proc/{pid}/{name}", "rb").read(1))
print(json.dumps(result))
""",
        worker,
    )
    assert result == {
        "ptrace": "EPERM",
        "pidfd_getfd": "EPERM",
        "fd": "EACCES",
        "root": "EACCES",
        "cwd": "EACCES",
        "mem": "EACCES",
        "environ": "EACCES",
        "ns/net": "EACCES",
    }


def test_killing_its_own_worker_restarts_it_and_spares_the_others(site: Site) -> None:
    """kill -9 of the attacker's own worker (same uid, so the kernel allows it)."""
    before = site.hosting.wait_status(lambda s: all(w["pid"] for w in s.values()))
    victim_pid = before[VICTIM.domain]["pid"]
    worker = before[site.domain]["pid"]
    killed = site.attacker.run(["kill", "-KILL", str(worker)])
    assert killed.returncode == 0, killed.stderr
    other = site.attacker.run(["kill", "-KILL", str(victim_pid)])
    assert other.returncode == 1 and "Operation not permitted" in other.stderr
    site.logged(rf"cde\.test: worker {worker} killed by SIGKILL; next start in \d+ s")
    after = site.hosting.wait_status(
        lambda s: s[site.domain]["pid"] not in (None, worker), timeout=30
    )
    assert after[site.domain]["restarts"] == before[site.domain]["restarts"] + 1
    assert after[VICTIM.domain]["pid"] == victim_pid
    assert after[VICTIM.domain]["restarts"] == before[VICTIM.domain]["restarts"]
    sent = site.sendmail(["-i", "x@rcpt.test"], b"Subject: after kill\n\nhi\n")
    assert sent.returncode == 0, sent.stderr
    message = site.arrived("after kill")
    assert received(message).startswith("from cde.test (cde.test [198.51.100.71])")


def test_stopping_its_own_worker_stalls_only_its_own_mail(site: Site) -> None:
    """kill -STOP of the attacker's own worker: the other tenants deliver on; the
    attacker's mail waits, and leaves once the worker is continued."""
    worker = site.worker(site.domain)
    assert site.attacker.run(["kill", "-STOP", str(worker)]).returncode == 0
    try:
        assert site.sendmail(["-i", "x@rcpt.test"], b"Subject: stalled\n\n").returncode == 0
        site.hosting.enqueue(VICTIM.domain, "alice@bcd.test", ["x@rcpt.test"], b"Subject: go\n\n")
        assert received(site.arrived("go")).startswith("from bcd.test (bcd.test [IPv6:")
        assert site.never_arrived("stalled")
        # The supervisor does not tell a stopped worker from an idle one (see the report).
        assert site.hosting.status()[site.domain]["pid"] == worker
    finally:
        os.kill(worker, signal.SIGCONT)
    assert received(site.arrived("stalled")).startswith("from cde.test (cde.test [198.51.")


def test_planted_files_in_its_own_queue_are_quarantined(site: Site) -> None:
    """The worker reads the attacker's home: its queue. Planted there: a symlink to the
    victim's queued file, a FIFO, a directory and garbage, each under a queue id."""
    spool = site.spool(site.domain)
    victims = site.spool(VICTIM.domain) / "deferred" / site.victims_message
    ids = [new_queue_id(time.time()) for _ in range(4)]
    planted = site.attacker.python(
        """
incoming, victims = sys.argv[1], sys.argv[2]
link, fifo, folder, junk = (os.path.join(incoming, i) for i in sys.argv[3:])
os.symlink(victims, link)
os.mkfifo(fifo)
os.mkdir(folder)
with open(junk, "wb") as f:
    f.write(b"NSMAIL queue file\\n" + os.urandom(64))
print(json.dumps("ok"))
""",
        spool / "incoming",
        victims,
        *ids,
    )
    assert planted == "ok"
    link, fifo, folder, junk = ids
    site.logged(rf"{link}: moved to corrupt/: .*Too many levels of symbolic links")
    site.logged(rf"{fifo}: moved to corrupt/: .*not a regular file")
    site.logged(rf"{folder}: moved to corrupt/: ")
    site.logged(rf"{junk}: moved to corrupt/: ")
    assert sorted(os.listdir(spool / "corrupt")) >= sorted(ids)
    # Still the attacker's worker, on its own address.
    assert site.sendmail(["-i", "x@rcpt.test"], b"Subject: after plants\n\n").returncode == 0
    assert received(site.arrived("after plants")).startswith(
        "from cde.test (cde.test [198.51.100.71])"
    )


# -- 5. sending as another domain ---------------------------------------------------------


def test_sendmail_refuses_another_domains_sender(site: Site) -> None:
    """`nsmail-sendmail -f x@bcd.test`, and `--tenant bcd.test`."""
    foreign = site.sendmail(["-i", "-f", "x@bcd.test", "x@rcpt.test"], b"Subject: f\n\n")
    assert foreign.returncode == 77
    assert foreign.stderr == (
        "nsmail-sendmail: sender x@bcd.test is not in cde.test"
        " (the tenant's configuration does not allow foreign_senders)\n"
    )
    tenant = site.sendmail(["-i", "--tenant", VICTIM.domain, "x@rcpt.test"], b"Subject: t\n\n")
    assert tenant.returncode == 77
    assert tenant.stderr == "nsmail-sendmail: only root may use --tenant\n"
    assert not [n for n in os.listdir(site.spool(site.domain) / "maildrop") if n[0] != "."]


def test_hand_written_queue_files_from_another_domain_are_quarantined(site: Site) -> None:
    """Queue files with sender x@bcd.test, written by hand (sendmail skipped) into the
    attacker's maildrop, incoming and deferred (due now)."""
    spool = site.spool(site.domain)
    ids = {
        state: site.plant(
            state,
            Envelope("x@bcd.test", ("x@rcpt.test",), arrival=time.time()),
            f"Subject: forged {state}\r\n\r\n".encode(),
            spool,
        )
        for state in ("maildrop", "incoming", "deferred")
    }
    for state, queue_id in ids.items():
        line = site.logged(rf"{queue_id}: moved to corrupt/: .*")
        assert line.endswith("sender <x@bcd.test> is not in cde.test"), (state, line)
        assert (spool / "corrupt" / queue_id).exists()
    assert site.sendmail(["-i", "x@rcpt.test"], b"Subject: after forgery\n\n").returncode == 0
    site.arrived("after forgery")
    assert all(site.never_arrived(f"forged {state}") for state in ids)
    assert "x@bcd.test" not in site.postfix.log()


def test_a_from_header_of_another_domain_leaves_as_the_tenant_unsigned(site: Site) -> None:
    """A message whose From: is the victim's, with the attacker's own envelope.

    The header is the user's to write (as with any MTA), so it is delivered; but it
    leaves from the attacker's address with its EHLO and envelope, and the attacker's
    DKIM key does not sign it (nsmail.tenant.dkim signs only From: in the tenant's domain), so
    the victim's DMARC sees neither aligned SPF nor an aligned signature.
    """
    for who in ("ceo@bcd.test", "alice@cde.test"):
        text = f"From: <{who}>\nSubject: header {who}\n\nhi\n".encode()
        assert site.sendmail(["-i", "x@rcpt.test"], text).returncode == 0
    spoofed = site.arrived("header ceo@bcd.test")
    own = site.arrived("header alice@cde.test")
    for message in (spoofed, own):
        assert received(message).startswith("from cde.test (cde.test [198.51.100.71])")
        assert message["Return-Path"].endswith("@cde.test>")
    assert str(spoofed["From"]) == "ceo@bcd.test"
    assert spoofed["DKIM-Signature"] is None
    assert " d=cde.test;" in " ".join(str(own["DKIM-Signature"]).split())


@pytest.mark.xfail(strict=True, reason="qmgr: sending limits apply only to mail from maildrop/")
def test_writing_past_maildrop_skips_no_sending_limit(site: Site) -> None:
    """A message over the tenant's recipient limit, submitted properly, is held; the same
    message written by hand into incoming/ must not reach its recipients either."""
    recipients = [f"r{n}@rcpt.test" for n in range(RECIPIENT_LIMIT + 1)]
    held = site.sendmail(["-i", *recipients], b"Subject: over the limit\n\n")
    assert held.returncode == 0
    site.logged(rf"held: {RECIPIENT_LIMIT + 1} recipients, over the limit of {RECIPIENT_LIMIT}")
    queue_id = site.plant(
        "incoming",
        Envelope("alice@cde.test", tuple(recipients), arrival=time.time()),
        b"Subject: over the limit, by hand\r\n\r\n",
        site.spool(site.domain),
    )
    # Whichever comes, the worker's verdict on the planted file: held, or sent.
    verdict = site.logged(rf"{queue_id}: tenant=\S+ (held|from=\S+ to=\S+ relay=\S+ .*status=\w+)")
    assert " held" in verdict, f"{queue_id} skipped the limit: {verdict}"


# -- 6. the status channel ----------------------------------------------------------------


def grab_report_channel(worker: int) -> socket.socket:
    """Root takes a copy of a worker's report channel, as a compromised worker holds it.

    The worker got two socketpair ends from the zygote, the DNS relay's and then the
    report channel; received with SCM_RIGHTS, they are its lowest socket descriptors.
    """
    sockets = sorted(
        int(fd)
        for fd in os.listdir(f"/proc/{worker}/fd")
        if os.readlink(f"/proc/{worker}/fd/{fd}").startswith("socket:")
    )
    pidfd = os.pidfd_open(worker)
    try:
        fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, sockets[1], 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


def forged_report(domain: str, error: str, state: str = "idle") -> bytes:
    return encode_report(
        Report(
            domain=domain,
            state=state,
            queue=dict.fromkeys(QUEUE_STATES, 0),
            total={"sent": 0, "deferred": 0, "bounced": 0},
            hour={"sent": 0, "deferred": 0, "bounced": 0},
            last_error=error,
            last_error_at=time.time() + 3600,  # newer than anything the worker says
            last_delivery_at=None,
            next_due=None,
            taken=0,
            latency_counts=(0,) * 10,
            latency_sum=0.0,
        )
    )


class Flood:
    """`rate` datagrams a second on `channel` from a thread, until stopped."""

    def __init__(self, channel: socket.socket, datagrams: list[bytes], rate: int) -> None:
        self.channel = channel
        self.datagrams = datagrams
        self.rate = rate
        self.sent = 0
        self.refused = 0  # the supervisor's end was full: it reads in bounded bites
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        batch = self.rate // 100
        while not self._stop.is_set():
            started = time.monotonic()
            for n in range(batch):
                try:
                    self.channel.send(self.datagrams[n % len(self.datagrams)], socket.MSG_DONTWAIT)
                    self.sent += 1
                except BlockingIOError:
                    self.refused += 1
                except OSError:
                    return  # the worker is gone
            time.sleep(max(0.0, 0.01 - (time.monotonic() - started)))


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_report_flood_leaves_the_supervisor_responsive(site: Site) -> None:
    """A compromised worker (the tenant cannot get the channel: see the test above; here
    root takes a copy) floods the supervisor with 10,000 datagrams a second: forged
    reports, another tenant's name, garbage, oversized. The control socket keeps
    answering, the victim's status stays current, the lies change only the attacker's
    own line, and the log gets one line for them."""
    worker = site.worker(site.domain)
    channel = grab_report_channel(worker)
    # The real worker is stopped while we speak for it: a report of its own could
    # replace the forged one before a status request sees it.
    with channel, stopped(worker):
        channel.send(forged_report(site.domain, "forged by the tenant"))
        forged = site.hosting.wait_status(
            lambda s: s[site.domain]["last_error"] == "forged by the tenant"
        )
        assert forged[VICTIM.domain]["last_error"] != "forged by the tenant"
        lies = [
            forged_report(site.domain, "flood"),
            forged_report(VICTIM.domain, "I am the victim"),
            b"{}",
            b"x" * 4000,
        ]
        before = site.hosting.status()
        supervisor = site.hosting.proc
        assert supervisor is not None
        cpu = cpu_seconds(supervisor.pid)
        slowest = 0.0
        with Flood(channel, lies, rate=10_000) as flood:
            site.hosting.enqueue(
                VICTIM.domain, "alice@bcd.test", ["x@rcpt.test"], b"Subject: during\r\n\r\n"
            )
            sent_before = before[VICTIM.domain]["total"]["sent"]
            deadline = time.monotonic() + 30
            while True:
                asked = time.monotonic()
                status = site.hosting.status()
                slowest = max(slowest, time.monotonic() - asked)
                if status[VICTIM.domain]["total"]["sent"] > sent_before:
                    break
                assert time.monotonic() < deadline, f"the victim's status froze: {status}"
                time.sleep(0.1)
            time.sleep(2)  # two seconds of flood at least, however fast the delivery was
        print(
            f"flood: {flood.sent} sent, {flood.refused} refused by a full socket; "
            f"supervisor CPU {cpu_seconds(supervisor.pid) - cpu:.2f} s; "
            f"slowest status {slowest:.2f} s"
        )
    assert flood.sent > 10_000
    assert slowest < 5.0
    site.arrived("during")
    after = site.hosting.status()
    assert after[VICTIM.domain]["last_error"] != "I am the victim"
    assert after[VICTIM.domain]["refused_reports"] == before[VICTIM.domain]["refused_reports"]
    assert after[site.domain]["refused_reports"] >= flood.sent // 2
    refusals = re.findall(r"cde\.test: refused a status report", site.hosting.log())
    assert len(refusals) == 1  # at most one a minute


def test_a_worker_hands_over_nothing_but_its_own_watch_as_it_retires(site: Site) -> None:
    """A retiring worker hands the supervisor its inotify descriptor with an "asleep"
    report. A compromised worker sends a pipe with such a report, a pipe and an inotify
    descriptor with ordinary reports: each is refused, none stays open in the supervisor,
    and the worker is still the one running."""
    worker = site.worker(site.domain)
    supervisor = site.hosting.proc
    assert supervisor is not None
    before = site.hosting.status()[site.domain]["refused_reports"]
    open_before = sorted(os.listdir(f"/proc/{supervisor.pid}/fd"))
    read_end, write_end = os.pipe()
    watch = inotify.Watch([site.spool(site.domain)])
    try:
        with grab_report_channel(worker) as channel, stopped(worker):
            for state, fd in (("asleep", read_end), ("idle", read_end), ("idle", watch.fd)):
                socket.send_fds(channel, [forged_report(site.domain, "fd", state)], [fd])
            status = site.hosting.wait_status(
                lambda s: s[site.domain]["refused_reports"] == before + 3
            )
            assert sorted(os.listdir(f"/proc/{supervisor.pid}/fd")) == open_before
    finally:
        watch.close()
        os.close(read_end)
        os.close(write_end)
    assert status[site.domain]["pid"] == worker and status[site.domain]["state"] != "asleep"


def test_a_deferred_file_dated_far_ahead_does_not_end_the_supervisor() -> None:
    """The attacker plants a file in its own deferred/ dated 30 days ahead (more than
    epoll's 2^31 ms) and sends ordinary mail, which wakes its worker; the worker retires
    "asleep" with that file still queued. The supervisor lives on (it used to die of an
    OverflowError, taking every tenant with it), and the other tenant delivers."""
    with Lab() as lab:
        Nsd(lab, dns_records())
        postfix = Postfix(lab)
        hosting = Hosting(lab)
        hosting.write_config((VICTIM, V4_ONLY), idle_exit=1, scan_interval=0.5)
        hosting.start()
        domain = V4_ONLY.domain
        uid = hosting.uid(domain)
        attacker = Attacker(lab, domain, uid, uid, hosting.home(domain), hosting.config_path)
        deferred = hosting.home(domain) / SPOOL_IN_HOME / "deferred"
        planted = attacker.python(
            """
# Dated before it appears in deferred/, where an awake worker may take it at once.
path = os.path.join(sys.argv[1], os.pardir, sys.argv[2])
open(path, "xb").close()
later = float(sys.argv[3])
os.utime(path, (later, later))
os.rename(path, os.path.join(sys.argv[1], sys.argv[2]))
print(json.dumps("ok"))
""",
            deferred,
            new_queue_id(time.time()),
            time.time() + 30 * 86400,
        )
        assert planted == "ok"
        sent = attacker.run([SENDMAIL, "-i", "x@rcpt.test"], stdin=b"Subject: wake\n\nhi\n")
        assert sent.returncode == 0, sent.stderr
        hosting.wait_status(
            lambda s: s[domain]["state"] == "asleep" and s[domain]["queue"]["deferred"] == 1,
            timeout=30,
        )
        # Both asleep, and the supervisor's loop past its last pending update: from here on
        # its next wake-up is the planted file's.
        hosting.wait_notify("STATUS=0 of 2 tenants running, 2 asleep, 1 messages deferred")
        hosting.enqueue(VICTIM.domain, "alice@bcd.test", ["x@rcpt.test"], b"Subject: on\r\n\r\n")
        deadline = time.monotonic() + 30
        while not any(m["Subject"] == "on" for m in postfix.messages()):
            assert time.monotonic() < deadline, hosting.log()
            time.sleep(0.05)
        assert hosting.proc is not None and hosting.proc.poll() is None
        assert hosting.status()[domain]["restarts"] == 0
        assert hosting.stop() == 0


# -- 7. the host's public maildrop ---------------------------------------------------------


def test_the_host_maildrop_takes_nothing_from_a_tenant(site: Site) -> None:
    """The host's maildrop (mode 1733) takes files from every local user. The attacker
    drops mail there to send as the hosting machine, lists it, and removes, overwrites
    or replaces another user's file there."""
    maildrop = site.hosting.host_spool / "maildrop"
    assert maildrop.stat().st_mode & 0o7777 == 0o1733
    # Another user's submission in progress (a dot name: the host's worker leaves it).
    theirs = maildrop / ".0000000000000000000000"
    theirs.write_bytes(b"someone else's")
    os.chown(theirs, site.hosting.uid_base + 999, site.hosting.uid_base + 999)
    theirs.chmod(0o644)
    queue_id = site.plant(
        "maildrop",
        Envelope("", ("x@rcpt.test",), arrival=time.time()),
        b"Subject: as the host\r\n\r\n",
        site.hosting.host_spool,
    )
    result = site.attacker.python(
        """
maildrop, theirs = sys.argv[1], sys.argv[2]
mine = os.path.join(maildrop, ".mine")
open(mine, "wb").close()
print(json.dumps({
    "list": outcome(lambda: os.listdir(maildrop)),
    "remove": outcome(lambda: os.unlink(theirs)),
    "overwrite": outcome(lambda: open(theirs, "r+b")),
    "replace": outcome(lambda: os.rename(mine, theirs)),
}))
os.unlink(mine)
""",
        maildrop,
        theirs,
    )
    assert result == {
        "list": "EACCES",
        "remove": "EPERM",
        "overwrite": "EACCES",
        "replace": "EPERM",
    }
    assert theirs.read_bytes() == b"someone else's"
    line = site.logged(rf"{queue_id}: moved to corrupt/: .*")
    assert line.endswith(f"uid {site.attacker.uid} is a tenant's: not host mail")
    assert (site.hosting.host_spool / "corrupt" / queue_id).exists()
    assert site.never_arrived("as the host")


def test_a_cleaned_file_in_the_host_maildrop_is_quarantined_too(site: Site) -> None:
    """The same, with the queue file claiming to be cleaned already (header completion
    done): that must not skip the check of who dropped it."""
    queue_id = site.plant(
        "maildrop",
        Envelope("", ("x@rcpt.test",), arrival=time.time(), cleaned=True),
        b"Subject: cleaned\r\n\r\n",
        site.hosting.host_spool,
    )
    site.logged(rf"{queue_id}: moved to corrupt/: uid {site.attacker.uid} is a tenant's", 10)


# -- nsmail exec --chroot and the tenant's home ---------------------------------------------


def test_nsmail_exec_chroot_reads_nothing_the_tenant_planted(site: Site) -> None:
    """The attacker plants a FIFO where root's `nsmail exec --chroot` would look for
    /proc/sys/kernel/cap_last_cap after its chroot into the tenant's home."""
    planted = site.attacker.python(
        """
os.makedirs(os.path.join(sys.argv[1], "proc/sys/kernel"))
os.mkfifo(os.path.join(sys.argv[1], "proc/sys/kernel/cap_last_cap"))
print(json.dumps("ok"))
""",
        site.attacker.home,
    )
    assert planted == "ok"
    command = [NSMAIL, "--config", str(site.hosting.config_path), "exec", "--chroot"]
    result = subprocess.run(
        [*command, site.domain, "--", "/no/such/program"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 127
    assert result.stderr == "nsmail: exec /no/such/program: No such file or directory\n"
