"""The `nsmail` command's own verbs that need no running supervisor."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosting import NSMAIL

from nsmail.tenant.spool import FLUSH_TRIGGER

pytestmark = pytest.mark.needs("root")

TENANT_UID = 47123


@pytest.fixture
def config() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="nsmail-cli-"))
    root.chmod(0o755)  # the tenant must reach its home
    home = root / "home"
    home.mkdir(mode=0o700)
    os.chown(home, TENANT_UID, TENANT_UID)
    path = root / "nsmail.toml"
    path.write_text(
        '[host]\nname = "abc.test"\nresolvers = ["203.0.113.53"]\n'
        f'run_dir = "{root}/run"\nspool = "{root}/hostspool"\n'
        '[network]\nmode = "routed"\n'
        f'[[tenant]]\ndomain = "bcd.test"\nipv4 = "198.51.100.70"\nuid = {TENANT_UID}\n'
        f'gid = {TENANT_UID}\nhome = "{home}"\n'
    )
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


def nsmail(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NSMAIL, "--config", str(config), *args], capture_output=True, text=True, check=False
    )


def test_flush_asks_each_worker_as_its_tenant(config: Path) -> None:
    result = nsmail(config, "flush")
    assert result.returncode == 0, result.stderr
    trigger = config.parent / "home/var/spool/nsmail" / FLUSH_TRIGGER
    # Made with the tenant's own rights: root never writes into a tenant's home.
    assert trigger.stat().st_uid == TENANT_UID
    assert nsmail(config, "flush", "nope.test").returncode == 64


def test_flush_does_not_follow_a_planted_symlink(config: Path) -> None:
    spool = config.parent / "home/var/spool"
    spool.mkdir(parents=True)
    (spool / "nsmail").symlink_to("/etc")
    os.lchown(spool / "nsmail", TENANT_UID, TENANT_UID)
    result = nsmail(config, "flush")
    assert result.returncode == 75
    assert not Path("/etc", FLUSH_TRIGGER).exists()


def test_check_accepts_a_good_configuration(config: Path) -> None:
    result = nsmail(config, "check")
    assert result.returncode == 0 and "1 tenants" in result.stdout


def test_check_says_where_each_tenants_mail_goes_and_warns_of_aliases(config: Path) -> None:
    aliases = config.parent / "aliases"
    aliases.write_text('list: "|/usr/lib/mailman/mail/mailman post list"\nops: root\n')
    text = config.read_text().replace("[network]", f'aliases = "{aliases}"\n[network]')
    config.write_text(text)
    result = nsmail(config, "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        'bcd.test: local_delivery = "mx": its own mail goes to its MX, as any other domain\'s'
    ]
    warning = f"nsmail: warning: {aliases}:1: '|/usr/lib/mailman/mail/mailman post list' is a"
    assert result.stderr.startswith(warning)
    config.write_text(text.replace('home = "', 'users = ["b1"]\nhome = "'))
    assert nsmail(config, "check").stdout.splitlines()[1] == (
        'bcd.test: local_delivery = "maildir": users b1; aliases postmaster -> b1'
    )
    # newaliases(1), as Debian's tools run it: the same warnings, and nothing to build.
    command = Path(NSMAIL).with_name("newaliases")
    result = subprocess.run(
        [str(command)],
        capture_output=True,
        text=True,
        check=False,
        env={"NSMAIL_CONFIG": str(config)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(warning)
    assert result.stdout == (
        f"{aliases}: 3 aliases; no supervisor is running: it applies at the next start\n"
    )


def test_status_names_a_missing_configuration_file(tmp_path: Path) -> None:
    missing = tmp_path / "nsmail.toml"
    result = nsmail(missing, "status")
    assert (result.returncode, result.stdout) == (78, "")
    assert result.stderr == f"nsmail: {missing}: file: No such file or directory\n"


def test_status_still_reaches_the_supervisor_of_a_broken_file(tmp_path: Path) -> None:
    # Broken, not missing: the supervisor started from it may still run (default run_dir).
    broken = tmp_path / "nsmail.toml"
    broken.write_bytes(b"[host\n\xff")
    result = nsmail(broken, "status")
    assert result.returncode != 78 and str(broken) not in result.stderr, result.stderr


def test_tenant_add_refuses_a_shared_home_and_an_address_off_the_bridge(config: Path) -> None:
    bridge = 'mode = "bridge"\nbridge = "nsbr0"\ngateway4 = "198.51.100.1"\n'
    bridge += 'subnet4 = "198.51.100.0/24"\n'
    config.write_text(config.read_text().replace('mode = "routed"\n', bridge))
    uid = TENANT_UID + 1
    home = config.parent / "new"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    add = ["tenant", "add", "new.test", "--uid", str(uid), "--gid", str(uid)]
    dropin = config.parent / "tenants.d" / "new.test.toml"

    shared = nsmail(config, *add, "--ipv4", "198.51.100.90", "--home", "/tmp")
    assert (shared.returncode, shared.stderr) == (
        78,
        f"nsmail: {dropin}: tenant[0].home: '/tmp' is writable by group or others"
        " (mode 1777): no place for a home\n",
    )
    off_the_bridge = nsmail(config, *add, "--ipv4", "203.0.113.90", "--home", str(home))
    assert (off_the_bridge.returncode, off_the_bridge.stderr) == (
        78,
        f"nsmail: {dropin}: tenant[0].ipv4: '203.0.113.90' is outside the bridge's subnet4"
        " (198.51.100.0/24)\n",
    )
    assert not dropin.exists()
    added = nsmail(config, *add, "--ipv4", "198.51.100.90", "--home", str(home))
    assert added.returncode == 0, added.stderr
    assert dropin.exists()
