"""`nsmail log` run for real, as root and as tenants' users, on histories their own uids
wrote (the events and the history file: tests/unit/test_events.py); and the completion
script as bash reads it."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsmail.commands.cli import completion_script
from nsmail.core import events
from nsmail.core.layout import HISTORY, SPOOL_IN_HOME
from nsmail.root.jail import run_as
from nsmail.tenant.history import CURRENT, History

pytestmark = pytest.mark.needs("root")
NSMAIL = Path(sys.executable).with_name("nsmail")
A, B = "aaa.test", "bbb.test"
EX_USAGE, EX_NOPERM = 64, 77


@pytest.fixture
def site() -> Iterator[tuple[Path, dict[str, int]]]:
    root = Path(tempfile.mkdtemp(prefix="nsmail-log-"))
    root.chmod(0o755)
    base = 56000 + secrets.randbelow(4000) * 2
    uids = {A: base, B: base + 1}
    tenants = ""
    for n, (domain, uid) in enumerate(uids.items()):
        (root / domain).mkdir(mode=0o700)
        os.chown(root / domain, uid, uid)
        tenants += (
            f'[[tenant]]\ndomain = "{domain}"\nipv4 = "198.51.100.{80 + n}"\n'
            f'uid = {uid}\ngid = {uid}\nhome = "{root / domain}"\n'
        )
    (root / "nsmail.toml").write_text(
        f'[host]\nname = "host.test"\nresolvers = ["203.0.113.53"]\nrun_dir = "{root}/run"\n'
        f'spool = "{root}/hostspool"\n[network]\nmode = "routed"\n{tenants}'
    )
    (root / "nsmail.toml").chmod(0o644)
    try:
        yield root, uids
    finally:
        shutil.rmtree(root)


def record(root: Path, uid: int, domain: str, *kept: events.Event) -> None:
    """As the tenant's worker would: with the tenant's uid, in its spool."""
    spool = root / domain / SPOOL_IN_HOME

    def write() -> None:
        spool.mkdir(parents=True, exist_ok=True)
        for event in kept:
            History(spool).record(event)

    assert run_as(uid, uid, write) == 0


def attempt(domain: str, to: str, at: float, reply: str = "250 2.0.0 Ok") -> events.Event:
    return events.Event(
        at,
        domain,
        "0" * 20,
        f"alice@{domain}",
        to,
        "mx.test[::1]:25",
        1.0,
        (0.1, 0.2, 0.3, 0.4),
        "2.0.0",
        "sent",
        reply,
    )


def log(root: Path, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    drop = uid != 0
    result = subprocess.run(
        [str(NSMAIL), "log", *args, "--config", str(root / "nsmail.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=root,
        user=uid if drop else None,
        group=uid if drop else None,
        extra_groups=[] if drop else None,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_root_sees_every_tenant_a_tenants_user_only_its_own(
    site: tuple[Path, dict[str, int]],
) -> None:
    root, uids = site
    now = float(int(time.time()))  # the JSON keeps milliseconds
    a_old, a_new = attempt(A, "x@rcpt.test", now - 7200), attempt(A, "y@rcpt.test", now - 60)
    b = attempt(B, "x@rcpt.test", now - 120, reply="250 ok \x1b[2J")
    record(root, uids[A], A, a_old, a_new)
    record(root, uids[B], B, b)

    everything = log(root, "--json")
    assert everything.returncode == 0, everything.stderr
    shown = [events.decode(line.encode()) for line in everything.stdout.splitlines()]
    assert shown == [a_old, b, a_new]  # oldest first, across tenants
    assert json.loads(everything.stdout.splitlines()[0])["tenant"] == A

    text = log(root)
    assert text.returncode == 0 and "\x1b" not in text.stdout and "\\x1b[2J" in text.stdout
    assert f"tenant={B} from=<alice@{B}> to=<x@rcpt.test>" in text.stdout

    mine = log(root, "--json", uid=uids[A])
    assert [events.decode(x.encode()) for x in mine.stdout.splitlines()] == [a_old, a_new]
    assert log(root, B, uid=uids[A]).returncode == EX_NOPERM
    assert log(root, "--since", "1h", "--to", "Y@RCPT.test", "--json").stdout.count("\n") == 1
    assert log(root, "--since", "yesterday").returncode == EX_USAGE


def test_root_reads_a_history_with_the_tenants_rights(site: tuple[Path, dict[str, int]]) -> None:
    root, uids = site
    record(root, uids[B], B, attempt(B, "x@rcpt.test", time.time()))
    secret = root / "secret"
    secret.write_text(events.encode(dataclasses.replace(attempt(A, "s@x.test", 0.0))) + "\n")
    secret.chmod(0o600)
    current = root / B / SPOOL_IN_HOME / HISTORY / CURRENT

    def plant() -> None:
        current.unlink()
        current.symlink_to(secret)

    assert run_as(uids[B], uids[B], plant) == 0
    shown = log(root, B, "--json")
    assert "s@x.test" not in shown.stdout  # the symlink is not followed, root's file unread
    assert shown.returncode == 75 and "bbb.test" in shown.stderr


@pytest.mark.needs("bash")
def test_the_completion_script_completes_verbs_and_options(tmp_path: Path) -> None:
    script = tmp_path / "nsmail.bash"
    script.write_text(completion_script())
    probe = (
        f"source {script}; COMP_WORDS=(nsmail lo); COMP_CWORD=1; _nsmail; echo ${{COMPREPLY[*]}};"
        " COMP_WORDS=(nsmail status --config x --j); COMP_CWORD=4; _nsmail; echo ${COMPREPLY[*]}"
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["log", "--json"]
