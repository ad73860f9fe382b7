"""A site for the real `nsmail-sendmail`: one tenant's configuration and home in a
directory every uid can read, and the console script run as that tenant."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nsmail.tenant.spool import MAILDROP, STATES, TMP

SENDMAIL = Path(sys.executable).with_name("nsmail-sendmail")


@dataclass(frozen=True, slots=True)
class Site:
    """A configuration with one tenant, in a directory every uid can read."""

    root: Path
    config: Path
    domain: str
    uid: int
    home: Path

    @property
    def spool(self) -> Path:
        return self.home / "var/spool/nsmail"

    @property
    def host_spool(self) -> Path:
        return self.root / "hostspool"

    def queued(self, state: str = MAILDROP) -> list[Path]:
        directory = self.spool / state
        return sorted(directory.iterdir()) if directory.exists() else []

    def write_config(self, *, foreign_senders: bool = False, tenant_extra: str = "") -> None:
        self.config.write_text(
            '[host]\nname = "host.test"\nresolvers = ["198.51.100.53"]\nuser = "nsmail"\n'
            f'spool = "{self.host_spool}"\n'
            '[network]\nmode = "routed"\n'
            f'[[tenant]]\ndomain = "{self.domain}"\nipv4 = "198.51.100.77"\n'
            f'uid = {self.uid}\ngid = {self.uid}\nhome = "{self.home}"\n'
            f"foreign_senders = {'true' if foreign_senders else 'false'}\n{tenant_extra}"
        )
        self.config.chmod(0o644)


def unused_ids(count: int) -> list[int]:
    """Ids above the usual ranges that name no user and no group on this machine."""
    taken = {u.pw_uid for u in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    return random.sample(sorted(set(range(45000, 60000)) - taken), count)


@contextlib.contextmanager
def made_site() -> Iterator[Site]:
    """A site with a new tenant of an unused uid, removed after (as root: the home is the
    tenant's)."""
    root = Path(tempfile.mkdtemp(prefix="nsmail-sendmail-"))
    try:
        root.chmod(0o755)  # the tenant uid must reach the configuration and its home
        (uid,) = unused_ids(1)
        home = root / "home"
        home.mkdir(mode=0o700)
        os.chown(home, uid, uid)
        made = Site(root, root / "nsmail.toml", f"t{secrets.token_hex(4)}.test", uid, home)
        made.write_config()
        yield made
    finally:
        shutil.rmtree(root)


def sendmail(
    site: Site,
    args: Sequence[str],
    message: bytes = b"Subject: hi\n\nhello\n",
    *,
    uid: int | None = None,
    config: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The console script as `uid` (default: the tenant; 0 runs it as root)."""
    as_uid = site.uid if uid is None else uid
    drop = as_uid != 0
    result = subprocess.run(
        [str(SENDMAIL), *args],
        input=message,
        capture_output=True,
        cwd=site.root,
        env={"NSMAIL_CONFIG": str(config or site.config), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
        user=as_uid if drop else None,
        group=as_uid if drop else None,
        extra_groups=[] if drop else None,  # root's groups must not come along
    )
    stderr = result.stderr.decode()
    if result.returncode != 0:  # every refusal is exactly one line, never a traceback
        assert stderr.startswith("nsmail-sendmail: ") and stderr.count("\n") == 1, stderr
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), stderr
    )


def assert_nothing_queued(site: Site) -> None:
    for state in (*STATES, TMP):
        assert site.queued(state) == [], state
