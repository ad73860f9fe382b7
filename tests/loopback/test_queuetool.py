"""`nsmail queue` run for real, as root and as tenants' users, on two tenants' spools in a
temporary directory (its pure planning and formatting: tests/unit/test_queueplan.py)."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deferred_mail import GREYLISTED, MX, REFUSED, WAITING

from nsmail.core.queuefile import Envelope, encode
from nsmail.root.jail import run_as
from nsmail.tenant.spool import (
    ACTIVE,
    DEFERRED,
    FLUSH_TRIGGER,
    HOLD,
    INCOMING,
    MAILDROP,
    SPOOL_IN_HOME,
    STATES,
    Spool,
    new_queue_id,
)

EX_USAGE, EX_NOINPUT, EX_TEMPFAIL, EX_NOPERM = 64, 66, 75, 77

pytestmark = pytest.mark.needs("root")
# `nsmail queue` once the lead wires it into nsmail.commands.cli; until then, queuetool.main itself.
NSMAIL = Path(sys.executable).with_name("nsmail")
VIA_CLI = True
_VIA_MAIN = (
    "import sys; from pathlib import Path; from nsmail import queuetool;"
    " sys.exit(queuetool.main(Path(sys.argv[1]), sys.argv[2:]))"
)
A, B, HOST = "aaa.test", "bbb.test", "host.test"
BODY = b"Subject: hi \x1b[2J\nFrom: alice@aaa.test\n\nthe body\n"


@dataclass(frozen=True)
class Site:
    root: Path
    config: Path
    uids: dict[str, int]

    def spool(self, domain: str) -> Spool:
        return Spool(self.root / domain / SPOOL_IN_HOME)

    def states(self, domain: str) -> dict[str, set[str]]:
        """Which ids each state directory holds (read by the test as root)."""
        root = self.spool(domain).root
        return {s: set(os.listdir(root / s)) if (root / s).is_dir() else set() for s in STATES}

    def where(self, domain: str, queue_id: str) -> list[str]:
        return [s for s, ids in self.states(domain).items() if queue_id in ids]


@pytest.fixture
def site() -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="nsmail-queue-"))
    root.chmod(0o755)  # tenants must reach their homes
    base = 52000 + secrets.randbelow(4000) * 2
    uids = {A: base, B: base + 1}
    tenants = ""
    for n, (domain, uid) in enumerate(uids.items()):
        home = root / domain
        home.mkdir(mode=0o700)
        os.chown(home, uid, uid)
        tenants += (
            f'[[tenant]]\ndomain = "{domain}"\nipv4 = "198.51.100.{80 + n}"\n'
            f'uid = {uid}\ngid = {uid}\nhome = "{home}"\n'
        )
    config = root / "nsmail.toml"
    config.write_text(
        f'[host]\nname = "{HOST}"\nresolvers = ["203.0.113.53"]\n'
        f'run_dir = "{root}/run"\nspool = "{root}/hostspool"\n'
        f'[network]\nmode = "routed"\n{tenants}'
    )
    config.chmod(0o644)
    try:
        yield Site(root, config, uids)
    finally:
        shutil.rmtree(root)


def put(
    site: Site,
    domain: str,
    state: str,
    data: bytes | None = None,
    *,
    recipients: tuple[str, ...] = ("bob@rcpt.test",),
    retry_at: float | None = None,
) -> str:
    """A message in `state` of a tenant's queue, written as the tenant (as its worker would)."""
    queue_id = new_queue_id(time.time())
    if data is None:
        envelope = Envelope(
            f"alice@{domain}", recipients, arrival=time.time(), attempts=1, cleaned=True
        )
        data = encode(envelope, BODY)
    spool = site.spool(domain)

    def write() -> None:
        spool.create()
        spool.put(state, queue_id, [data])
        if retry_at is not None:
            spool.schedule(queue_id, state, retry_at)

    uid = site.uids[domain]
    assert run_as(uid, uid, write) == 0
    return queue_id


def queue(site: Site, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    if VIA_CLI:
        argv = [str(NSMAIL), "--config", str(site.config), "queue", *args]
    else:
        argv = [sys.executable, "-c", _VIA_MAIN, str(site.config), *args]
    drop = uid != 0
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=site.root,
        timeout=30,  # a queue file that blocks reading (a FIFO) must not hang the test
        check=False,
        user=uid if drop else None,
        group=uid if drop else None,
        extra_groups=[] if drop else None,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def listed(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def snapshot(site: Site, domain: str) -> dict[str, tuple[bytes, float]]:
    """Every file of a queue with its bytes and mtime, to prove nothing changed."""
    root = site.spool(domain).root
    return {
        f"{s}/{n}": ((root / s / n).read_bytes(), (root / s / n).stat().st_mtime)
        for s in STATES
        for n in sorted(os.listdir(root / s))
    }


def test_root_lists_every_queue_and_a_tenant_only_its_own(site: Site) -> None:
    a1 = put(site, A, INCOMING, recipients=("bob@rcpt.test", "carol@rcpt.test"))
    a2 = put(site, A, DEFERRED, retry_at=2e9)
    b1 = put(site, B, HOLD)
    everything = listed(queue(site, "list", "--json"))
    assert {(m["tenant"], m["queue_id"], m["queue_name"]) for m in everything} == {
        (A, a1, INCOMING),
        (A, a2, DEFERRED),
        (B, b1, HOLD),
    }
    first = next(m for m in everything if m["queue_id"] == a1)
    assert set(first) == {
        "queue_name",
        "queue_id",
        "arrival_time",
        "message_size",
        "sender",
        "recipients",
        "tenant",
        "attempts",
        "next_attempt",
        "delay_warned",
        "submitter",
        "recipients_from_headers",
        "error",
    }
    assert first["recipients"] == [{"address": "bob@rcpt.test"}, {"address": "carol@rcpt.test"}]
    assert first["sender"] == f"alice@{A}" and first["message_size"] == len(BODY)
    assert first["attempts"] == 1 and first["next_attempt"] is None and first["error"] is None
    assert next(m for m in everything if m["queue_id"] == a2)["next_attempt"] == 2_000_000_000

    text = queue(site, "list")
    assert text.returncode == 0 and a1 in text.stdout and b1 in text.stdout
    assert "3 Requests" in text.stdout

    mine = listed(queue(site, "list", "--json", uid=site.uids[A]))
    assert {m["queue_id"] for m in mine} == {a1, a2}
    assert {m["queue_id"] for m in listed(queue(site, "list", "--json", "--tenant", B))} == {b1}
    assert queue(site, "list", "--tenant", "nope.test").returncode == EX_USAGE


@pytest.mark.parametrize(
    "args",
    [
        ("show", "{b}"),
        ("show", "--tenant", B, "{b}"),
        ("delete", "{b}"),
        ("hold", "{b}"),
        ("requeue", "{b}"),
        ("release", "{b}"),
        ("delete", "--all", "--tenant", B),
        ("list", "--tenant", B),
        ("list", "--tenant", HOST),
        ("flush", "--tenant", B),
    ],
)
def test_a_tenant_never_sees_or_touches_another_queue(site: Site, args: tuple[str, ...]) -> None:
    mine = put(site, A, DEFERRED)
    theirs = put(site, B, DEFERRED)
    before = snapshot(site, B)
    result = queue(site, *(a.format(b=theirs) for a in args), uid=site.uids[A])
    assert result.returncode == EX_NOPERM, result.stderr
    assert result.stdout == ""
    assert snapshot(site, B) == before
    assert not (site.spool(B).root / FLUSH_TRIGGER).exists()
    assert site.where(A, mine) == [DEFERRED]


def test_neither_root_nor_a_tenant_is_refused(site: Site) -> None:
    put(site, A, DEFERRED)
    result = queue(site, "list", uid=65534)
    assert result.returncode == EX_NOPERM and "neither root nor a tenant" in result.stderr
    # The host's own user is the owner of the host's queue (here never made: empty).
    host = queue(site, "list", uid=pwd.getpwnam("nsmail").pw_uid)
    assert host.returncode == 0 and host.stdout == "Mail queue is empty\n", host.stderr
    assert queue(site, "list", "--tenant", A, uid=pwd.getpwnam("nsmail").pw_uid).returncode == 77


def test_hold_release_requeue_delete_change_exactly_the_named(site: Site) -> None:
    d1, d2, i1 = put(site, A, DEFERRED), put(site, A, DEFERRED), put(site, A, INCOMING)
    other = put(site, B, DEFERRED)
    as_a = site.uids[A]

    result = queue(site, "hold", d1, i1, uid=as_a)
    assert result.returncode == 0, result.stderr
    assert f"{d1} ({A}): deferred/ -> hold/" in result.stdout
    assert site.states(A)[HOLD] == {d1, i1} and site.states(A)[DEFERRED] == {d2}
    # Held mail stays held: it is in no state the worker delivers from.
    for state in (MAILDROP, INCOMING, ACTIVE, DEFERRED):
        assert d1 not in site.states(A)[state]
    again = queue(site, "hold", d1, uid=as_a)
    assert again.returncode == 0 and "already in hold/" in again.stdout

    assert queue(site, "release", i1).returncode == 0  # root, on A's queue, as A
    assert site.where(A, i1) == [INCOMING]
    assert (site.spool(A).root / INCOMING / i1).stat().st_uid == site.uids[A]
    assert queue(site, "requeue", d2, d1, uid=as_a).returncode == 0
    assert site.states(A)[INCOMING] == {i1, d2, d1} and site.states(A)[HOLD] == set()

    result = queue(site, "delete", "--json", d2)
    assert listed(result) == [
        {"action": "delete", "queue_id": d2, "tenant": A, "from": INCOMING, "to": None}
        | {"code": 0, "error": None}
    ]
    assert site.where(A, d2) == []
    assert site.states(A)[INCOMING] == {i1, d1} and site.where(B, other) == [DEFERRED]


def test_one_bad_id_changes_nothing(site: Site) -> None:
    d1 = put(site, A, DEFERRED)
    busy = put(site, A, ACTIVE)
    fresh = put(site, A, MAILDROP)
    held = put(site, A, HOLD)
    before = snapshot(site, A)
    cases = [
        (("hold", d1, "0000000000000000unknown"), EX_NOINPUT, "no such message"),
        (("hold", d1, busy), EX_TEMPFAIL, "being delivered, try again"),
        (("delete", d1, fresh), EX_TEMPFAIL, "not yet taken in by the worker"),
        (("release", held, d1), EX_NOINPUT, "release applies to mail in hold/"),
        (("hold", d1, "../../etc"), EX_USAGE, "bad queue id"),
        (("hold", "--all", d1), EX_USAGE, "or use --all"),
        (("delete",), EX_USAGE, "or use --all"),
    ]
    for args, code, message in cases:
        result = queue(site, *args)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and result.stdout == ""
        assert snapshot(site, A) == before
    # Only its own queue for a tenant: an id it does not have is not permitted, like another's.
    result = queue(site, "hold", d1, "0000000000000000unknown", uid=site.uids[A])
    assert result.returncode == EX_NOPERM and snapshot(site, A) == before


def test_the_same_id_in_two_queues_needs_a_tenant(site: Site) -> None:
    planted = put(site, A, DEFERRED)
    data = (site.spool(A).root / DEFERRED / planted).read_bytes()
    spool_b = site.spool(B)
    assert run_as(site.uids[B], site.uids[B], lambda: _put_as(spool_b, planted, data)) == 0
    result = queue(site, "delete", planted)
    assert result.returncode == EX_USAGE and "name one with --tenant" in result.stderr
    assert queue(site, "show", planted).returncode == EX_USAGE
    assert queue(site, "delete", "--tenant", B, planted).returncode == 0
    assert site.where(B, planted) == [] and site.where(A, planted) == [DEFERRED]


def _put_as(spool: Spool, queue_id: str, data: bytes) -> None:
    spool.create()
    spool.put(DEFERRED, queue_id, [data])


def test_all(site: Site) -> None:
    a = [put(site, A, INCOMING), put(site, A, DEFERRED)]
    b = put(site, B, DEFERRED)
    result = queue(site, "hold", "--all", "--tenant", A)
    assert result.returncode == 0, result.stderr
    assert site.states(A)[HOLD] == set(a) and site.where(B, b) == [DEFERRED]
    assert queue(site, "release", "--all", uid=site.uids[A]).returncode == 0
    assert site.states(A)[INCOMING] == set(a) and site.states(A)[HOLD] == set()
    busy = put(site, B, ACTIVE)
    result = queue(site, "delete", "--all")  # every queue: root's default
    assert result.returncode == EX_TEMPFAIL and f"{busy} ({B}): being delivered" in result.stderr
    assert site.states(A)[INCOMING] == set() and site.states(B)[DEFERRED] == set()
    assert site.where(B, busy) == [ACTIVE]


def test_show(site: Site) -> None:
    d1 = put(site, A, DEFERRED, retry_at=2e9)
    result = queue(site, "show", d1, uid=site.uids[A])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"Queue ID:     {d1}\n" in out and f"Sender:       <alice@{A}>\n" in out
    assert "Recipient:    bob@rcpt.test\n" in out and "Next attempt:" in out
    assert "Subject: hi \\x1b[2J\n" in out and "\x1b" not in out
    assert "the body" not in out
    assert "\nthe body\n" in queue(site, "show", "--body", d1).stdout
    shown = listed(queue(site, "show", "--json", "--body", d1))[0]
    assert shown["queue_id"] == d1 and shown["tenant"] == A
    assert shown["headers"] == BODY.split(b"\n\n")[0].decode() + "\n"
    assert shown["body"] == "the body\n"
    assert queue(site, "show", "0000000000000000unknown").returncode == EX_NOINPUT
    # Why deferred mail waits comes back from the child running as the tenant.
    waiting = put(site, A, DEFERRED, encode(WAITING, BODY), retry_at=2e9)
    (shown,) = listed(queue(site, "show", "--json", waiting, uid=site.uids[A]))
    assert [r.get("delay_reason") for r in shown["recipients"]] == [
        GREYLISTED.reason,
        REFUSED.reason,
        None,
    ]
    assert f"Delay reason: {MX} said: 451" in queue(site, "show", waiting).stdout
    assert f"({MX} said: 451 4.7.1" in queue(site, "list", "--tenant", A).stdout
    # More than a pipe holds comes back from the child running as the tenant.
    large = b"x" * 99 + b"\n"
    big = put(
        site, B, INCOMING, encode(Envelope("", ("bob@rcpt.test",)), b"A: 1\n\n" + large * 3000)
    )
    assert queue(site, "show", "--body", big).stdout.endswith("\n" + large.decode() * 3000)


def test_hostile_files_are_listed_as_unreadable(site: Site) -> None:
    good = put(site, A, DEFERRED)
    garbage = put(site, A, DEFERRED, b"\x00garbage\n" * 100)
    deferred = site.spool(A).root / DEFERRED
    uid = site.uids[A]
    names = {"link": "0000000000000001link", "fifo": "0000000000000002fifo"}
    names["dir"] = "0000000000000003dir"
    (deferred / names["link"]).symlink_to("/etc/shadow")
    os.lchown(deferred / names["link"], uid, uid)
    os.mkfifo(deferred / names["fifo"])
    (deferred / names["dir"]).mkdir()
    for name in (names["fifo"], names["dir"]):
        os.chown(deferred / name, uid, uid)

    for as_uid in (0, uid):
        entries = {m["queue_id"]: m for m in listed(queue(site, "list", "--json", uid=as_uid))}
        assert set(entries) == {good, garbage, *names.values()}
        assert entries[good]["error"] is None
        assert entries[garbage]["error"] == "bad magic or unsupported version"
        assert entries[garbage]["message_size"] == 900 and entries[garbage]["sender"] is None
        assert entries[names["link"]]["error"] == "a symbolic link (not followed)"
        assert entries[names["fifo"]]["error"] == "not a regular file"
        assert entries[names["dir"]]["error"] == "not a regular file"
        text = queue(site, "list", uid=as_uid)
        assert text.returncode == 0 and text.stdout.count("(unreadable: ") == 4

    shown = queue(site, "show", names["fifo"])
    assert shown.returncode == 0 and "Error:        not a regular file" in shown.stdout
    assert queue(site, "delete", names["link"], garbage).returncode == 0
    assert Path("/etc/shadow").exists()
    assert site.where(A, names["link"]) == [] and site.where(A, garbage) == []


def test_flush_asks_the_worker_as_its_tenant(site: Site) -> None:
    put(site, A, DEFERRED)
    assert queue(site, "flush", "--tenant", A).returncode == 0
    trigger = site.spool(A).root / FLUSH_TRIGGER
    assert trigger.stat().st_uid == site.uids[A]
    trigger.unlink()
    assert queue(site, "flush", uid=site.uids[A]).returncode == 0 and trigger.exists()
    assert not (site.spool(B).root / FLUSH_TRIGGER).exists()
