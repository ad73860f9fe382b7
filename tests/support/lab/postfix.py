"""A strict receiving Postfix (Debian's) in the lab's "internet" namespace.

It listens on ``MX_V4``/``MX_V6`` port 25, accepts mail for ``rcpt.test`` and
``other.test`` (or the ``domains`` given) into one Maildir (virtual(8), as ``nobody``),
and checks its clients the way a careful receiver does: ``reject_unknown_client_hostname``
(forward-confirmed reverse DNS), ``smtpd_helo_required``, ``reject_unknown_helo_hostname``.
Both unknown-name rejects are made permanent (550; Postfix defaults to 450), but a DNS
lookup that fails temporarily still gives 450. ``smtpd_delay_reject`` keeps its default,
so client and HELO rejects arrive as the reply to RCPT TO, as from a stock Postfix.

``helo_must_match=True`` adds ``helo_policy.py`` as a spawn(8) policy service: the stock
checks accept "HELO bcd.test" from a client verified as abc.test (the mismatch only shows
in the Received header, ``from bcd.test (abc.test [...])``); the policy refuses it.
``recipient_status`` maps recipient addresses to the reply Postfix gives them at RCPT TO
(``check_recipient_access``), by default ``reject@rcpt.test`` (550) and
``tempfail@rcpt.test`` (451). ``certificate=(cert, key)`` offers STARTTLS with that
certificate (PEM files), and says in each Received header whether TLS carried the mail;
without it, STARTTLS is not offered at all (as when a man in the middle strips it).

Resolver: Postfix uses glibc's resolver, which only reads /etc/resolv.conf, so it is
started with ``lab.run(..., resolver=True)`` (a private bind mount of the lab's
resolv.conf; see ``topology``). ``ip netns exec`` with /etc/netns/NAME/resolv.conf would
do as well for this leaf, but one mechanism for the whole lab is simpler.

Everything lives in a lab temporary directory: config (``-c DIR``), queue, data directory
(owned by postfix, or start fails on master.lock), Maildir and ``maillog_file`` (there is
no syslog). master.cf chroots nothing. Start-up takes about 10 ms because it skips two
slow steps of ``postfix start``: the queue directories are made here as post-install
would (its shell loop costs a second), then ``master -w`` runs directly, and the config
files are back-dated, since Postfix rereads a main.cf younger than about two seconds
every 300 ms until it is older. Stopping sends SIGTERM to the master as ``postfix stop``
does, but polls (counting a zombie as gone: this machine's init reaps orphans slowly)
instead of sleeping whole seconds; leftovers die with the lab.

Security: test infrastructure, runs as root; serves only inside the lab namespace.
"""

from __future__ import annotations

import contextlib
import email.policy
import grp
import os
import pwd
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from nsmail.lab.topology import MX_V4, MX_V6

from .topology import Lab, LabError

DOMAINS = ("rcpt.test", "other.test")
DEFAULT_RECIPIENT_STATUS: Mapping[str, str] = {
    "reject@rcpt.test": "550 5.1.1 no such user",
    "tempfail@rcpt.test": "451 4.3.0 try later",
}
_POLICY_SCRIPT = Path(__file__).with_name("helo_policy.py")
_STOP_TIMEOUT = 5.0
MASTER = "/usr/lib/postfix/sbin/master"
# Queue directories as post-install creates them (/etc/postfix/postfix-files):
# name -> (mode, owned by postfix, group postdrop).
QUEUE_DIRS = {
    "active": (0o700, True, False),
    "bounce": (0o700, True, False),
    "corrupt": (0o700, True, False),
    "defer": (0o700, True, False),
    "deferred": (0o700, True, False),
    "flush": (0o700, True, False),
    "hold": (0o700, True, False),
    "incoming": (0o700, True, False),
    "private": (0o700, True, False),
    "saved": (0o700, True, False),
    "trace": (0o700, True, False),
    "maildrop": (0o730, True, True),
    "public": (0o710, True, True),
    "pid": (0o755, False, False),
}

# Like Debian's master.cf, minus chroot and the services a receiver does not use.
MASTER_CF = """\
smtp       inet      n - n - - smtpd
pickup     unix      n - n 60 1 pickup
cleanup    unix      n - n - 0 cleanup
qmgr       unix      n - n 300 1 qmgr
rewrite    unix      - - n - - trivial-rewrite
bounce     unix      - - n - 0 bounce
defer      unix      - - n - 0 bounce
trace      unix      - - n - 0 bounce
verify     unix      - - n - 1 verify
flush      unix      n - n 1000? 0 flush
proxymap   unix      - - n - - proxymap
proxywrite unix      - - n - 1 proxymap
smtp       unix      - - n - - smtp
relay      unix      - - n - - smtp
showq      unix      n - n - - showq
error      unix      - - n - - error
retry      unix      - - n - - error
discard    unix      - - n - - discard
local      unix      - n n - - local
virtual    unix      - n n - - virtual
anvil      unix      - - n - 1 anvil
scache     unix      - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def stop_master(pid: int) -> None:
    """SIGTERM to a Postfix master, as `postfix stop` does; wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    # The master leads its own process group, as `postfix stop` assumes when forcing.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    # A zombie counts as gone: this machine's init reaps orphans only every second or so.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class Postfix:
    """A running receiving Postfix in ``lab.net``; started by the constructor."""

    def __init__(
        self,
        lab: Lab,
        *,
        helo_must_match: bool = False,
        recipient_status: Mapping[str, str] = DEFAULT_RECIPIENT_STATUS,
        certificate: tuple[Path, Path] | None = None,
        domains: tuple[str, ...] = DOMAINS,
    ) -> None:
        self._lab = lab
        self.dir = lab.tempdir("postfix")
        self.maildir = self.dir / "mail" / "Maildir"
        self._running = False
        lab.defer(self.stop)
        self._write_config(helo_must_match, recipient_status, certificate, domains)
        self._start()

    # -- reading what arrived ----------------------------------------------------------

    def messages(self) -> list[EmailMessage]:
        """Every delivered message, oldest first."""
        paths = [p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*")]
        paths.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        parser = BytesParser(_class=EmailMessage, policy=email.policy.default)
        messages = []
        for path in paths:
            with path.open("rb") as f:
                message = parser.parse(f)
            assert isinstance(message, EmailMessage)
            messages.append(message)
        return messages

    def log(self) -> str:
        """Postfix's maillog so far."""
        try:
            return (self.dir / "log" / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        """Wait until at least ``count`` messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        while len(messages := self.messages()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(messages)} of {count} messages after {timeout} s; maillog:\n"
                    + self.log()
                )
            time.sleep(0.05)
        return messages

    def arrived(self, subject: str, timeout: float = 30.0) -> EmailMessage:
        """Wait for the message with ``subject``; return it."""
        deadline = time.monotonic() + timeout
        while not (found := [m for m in self.messages() if m["Subject"] == subject]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{subject!r} never arrived; maillog:\n{self.log()}")
            time.sleep(0.05)
        return found[0]

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop Postfix if it runs (idempotent)."""
        if not self._running:
            return
        self._running = False
        try:
            pid = int((self.dir / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return
        stop_master(pid)

    def _start(self) -> None:
        # `postfix start` ends with master -w (wait until the daemon is ready).
        argv = [MASTER, "-c", str(self.dir / "etc"), "-w"]
        result = self._lab.run(self._lab.net, argv, resolver=True, check=False)
        self._running = True
        if result.returncode != 0:
            raise LabError(f"postfix start: {result.stdout}{result.stderr}\n{self.log()}")

    def _write_config(
        self,
        helo_must_match: bool,
        recipient_status: Mapping[str, str],
        certificate: tuple[Path, Path] | None,
        domains: tuple[str, ...],
    ) -> None:
        d = self.dir
        postfix = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        for sub in ("etc", "spool", "data", "log", "mail"):
            (d / sub).mkdir(mode=0o755)
        os.chown(d / "data", postfix.pw_uid, postfix.pw_gid)
        os.chown(d / "mail", nobody.pw_uid, nobody.pw_gid)
        postdrop = grp.getgrnam("postdrop").gr_gid
        for name, (mode, postfix_owned, postdrop_group) in QUEUE_DIRS.items():
            path = d / "spool" / name
            path.mkdir()
            os.chown(
                path, postfix.pw_uid if postfix_owned else 0, postdrop if postdrop_group else 0
            )
            path.chmod(mode)
        access = d / "etc" / "recipient_access"
        access.write_text("".join(f"{rcpt} {reply}\n" for rcpt, reply in recipient_status.items()))
        helo_restrictions = ["reject_unknown_helo_hostname"]
        master_cf = MASTER_CF
        if helo_must_match:
            script = d / "helo_policy.py"
            shutil.copyfile(_POLICY_SCRIPT, script)
            script.chmod(0o644)
            # The venv's python is a symlink to the system one; nobody can run the target.
            python = os.path.realpath(sys.executable)
            master_cf += f"helo-policy unix - n n - 0 spawn user=nobody argv={python} -I {script}\n"
            helo_restrictions.append("check_policy_service unix:private/helo-policy")
        main_cf = {
            "compatibility_level": "3.6",
            "queue_directory": f"{d}/spool",
            "data_directory": f"{d}/data",
            "maillog_file": f"{d}/log/maillog",
            "maillog_file_prefixes": str(d),
            "myhostname": "mx.test",
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "inet_interfaces": f"{MX_V4}, [{MX_V6}]",
            "inet_protocols": "all",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            # Room for the tests' 50 MB messages (the defaults are about 10 MB).
            "message_size_limit": str(100 << 20),
            "virtual_mailbox_limit": "0",
            "virtual_mailbox_domains": ", ".join(domains),
            "virtual_mailbox_base": f"{d}/mail",
            "virtual_mailbox_maps": "static:Maildir/",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "smtpd_helo_required": "yes",
            "smtpd_client_restrictions": "reject_unknown_client_hostname",
            "smtpd_helo_restrictions": ", ".join(helo_restrictions),
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": f"check_recipient_access texthash:{access}",
            "unknown_client_reject_code": "550",
            "unknown_hostname_reject_code": "550",
        }
        if certificate is not None:
            main_cf["smtpd_tls_cert_file"], main_cf["smtpd_tls_key_file"] = map(str, certificate)
            main_cf["smtpd_tls_security_level"] = "may"
            main_cf["smtpd_tls_received_header"] = "yes"
            master_cf += "tlsmgr unix - - n 1000? 1 tlsmgr\n"
        (d / "etc" / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in main_cf.items())
        )
        (d / "etc" / "master.cf").write_text(master_cf)
        # Postfix rereads a main.cf younger than about two seconds (it might be mid-edit).
        past = time.time() - 60
        for path in (d / "etc").iterdir():
            os.utime(path, (past, past))
