"""Local delivery (nsmail.tenant.local) into Maildirs and a queue in a temporary directory:
aliases, .forward files, forwarded copies, loops, "mx" tenants and the host's postmaster."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nsmail.core.config import Tenant
from nsmail.core.handoff import MAILBOX, POSTMASTER, Answer, Request
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.queuefile import Envelope, decode
from nsmail.tenant.local import LocalAgent, for_host, for_tenant
from nsmail.tenant.spool import INCOMING, Spool

TENANT = Tenant(
    domain="bcd.test",
    ipv4=IPv4Address("198.51.100.70"),
    ipv6=None,
    ehlo="bcd.test",
    uid=1001,
    gid=1001,
    home=Path("/"),
    users=("alice", "bob"),
    source="test",
    aliases=(
        ("info", ("alice", "x@rcpt.test")),
        ("loop", ("loop2",)),
        ("loop2", ("loop@bcd.test",)),
        ("postmaster", ("alice",)),
    ),
)
POSTMASTER_OF_HOST = "postmaster@abc.test"
MESSAGE = Message.of(b"Subject: hi\r\n\r\nhello\r\n")


class FakeHandoffs:
    """Answers every hand-off with `answer`, remembering what it was given."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.given: list[tuple[Request, bytes]] = []

    async def hand_off(self, request: Request, message: Iterable[bytes]) -> Answer:
        self.given.append((request, b"".join(message)))
        return self.answer


def agent(home: Path, tenant: Tenant = TENANT, handoffs: object = None) -> LocalAgent:
    spool = Spool(home / "spool")
    spool.create()
    return for_tenant(tenant, home, spool, POSTMASTER_OF_HOST, handoffs)  # type: ignore[arg-type]


def deliver(local: LocalAgent, *recipients: str, message: Message = MESSAGE) -> list[Outcome]:
    envelope = Envelope("carol@bcd.test", recipients)
    return asyncio.run(local.deliver("q1", envelope, message))


def maildir(home: Path, user: str) -> list[bytes]:
    new = home / "mail" / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def test_an_alias_writes_its_users_mailbox_and_forwards_one_copy(tmp_path: Path) -> None:
    local = agent(tmp_path)
    (outcome,) = deliver(local, "Info@bcd.test")
    assert outcome.status == Status.DELIVERED
    (stored,) = maildir(tmp_path, "alice")
    assert stored.startswith(b"Return-Path: <carol@bcd.test>\r\nDelivered-To: Info@bcd.test\r\n")
    (copy,) = local.spool.ids(INCOMING)
    assert outcome.text == f"2.0.0 delivered to maildir; forwarded as {copy}"
    envelope, body = decode(local.spool.path(INCOMING, copy).read_bytes())
    assert (envelope.sender, envelope.recipients, envelope.cleaned) == (
        "carol@bcd.test",
        ("x@rcpt.test",),
        True,
    )
    assert body == b"Delivered-To: Info@bcd.test\r\n" + b"".join(MESSAGE.raw())


def test_a_user_is_delivered_and_an_unknown_one_bounces_as_before(tmp_path: Path) -> None:
    bob, nobody = deliver(agent(tmp_path), "bob@bcd.test", "nobody@bcd.test")
    assert (bob.status, bob.text, bob.relay) == (
        Status.DELIVERED,
        "2.0.0 delivered to maildir",
        "local",
    )
    assert (nobody.status, nobody.text) == (Status.PERMANENT, "5.1.1 no such user here")


def test_loops_bounce_whether_in_the_aliases_or_in_the_header(tmp_path: Path) -> None:
    local = agent(tmp_path)
    (static,) = deliver(local, "loop@bcd.test")
    assert (static.status, static.text) == (
        Status.PERMANENT,
        "5.4.6 alias loop: loop -> loop2 -> loop",
    )
    came_back = Message.of(b"Delivered-To: info@BCD.test\r\nSubject: again\r\n\r\nhi\r\n")
    info, bob = deliver(local, "info@bcd.test", "bob@bcd.test", message=came_back)
    assert (info.status, info.text) == (
        Status.PERMANENT,
        "5.4.6 mail forwarding loop for info@bcd.test",
    )
    assert bob.status == Status.DELIVERED
    many = Message.of(b"Received: from x\r\n" * 100 + b"\r\nhi\r\n")
    (hops,) = deliver(local, "bob@bcd.test", message=many)
    assert (hops.status, hops.text) == (Status.PERMANENT, "5.4.6 too many hops (100): a loop")
    assert local.spool.ids(INCOMING) == []


def test_a_users_forward_file_is_followed_and_an_unusable_one_waits(tmp_path: Path) -> None:
    local = agent(tmp_path)
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    forward = tmp_path / "mail" / "bob" / ".forward"
    forward.write_text("# bob's\n\\bob, bob@elsewhere.test\n")
    (outcome,) = deliver(local, "bob@bcd.test")
    assert outcome.status == Status.DELIVERED and len(maildir(tmp_path, "bob")) == 1
    (copy,) = local.spool.ids(INCOMING)
    assert decode(local.spool.path(INCOMING, copy).read_bytes())[0].recipients == (
        "bob@elsewhere.test",
    )
    forward.unlink()
    forward.symlink_to("/etc/passwd")
    (outcome,) = deliver(local, "bob@bcd.test")
    assert (outcome.status, outcome.text) == (
        Status.TEMPORARY,
        "4.3.5 mail/bob/.forward is a symbolic link",
    )


def test_a_mailbox_that_cannot_be_written_waits_and_forwards_nothing(tmp_path: Path) -> None:
    local = agent(tmp_path)
    (tmp_path / "mail" / "alice").mkdir(parents=True)
    (tmp_path / "mail" / "alice" / "new").write_text("not a directory")
    (outcome,) = deliver(local, "info@bcd.test")
    assert outcome.status == Status.TEMPORARY and outcome.text.startswith("4.2.0 ")
    assert local.spool.ids(INCOMING) == []


def test_an_mx_tenants_own_domain_is_not_local_but_the_hosts_postmaster_is(
    tmp_path: Path,
) -> None:
    mx = dataclasses.replace(TENANT, users=(), aliases=(), local_delivery="mx")
    handoffs = FakeHandoffs(Answer(Status.DELIVERED, "2.0.0 queued for the postmaster"))
    local = agent(tmp_path, mx, handoffs)
    assert not local.is_local("info@bcd.test")
    assert local.is_local("PostMaster@abc.test") and not local.is_local("root@abc.test")
    (outcome,) = deliver(local, "PostMaster@abc.test")
    assert (outcome.status, outcome.relay) == (Status.DELIVERED, "local")
    ((request, content),) = handoffs.given
    assert request == Request(POSTMASTER, "", "") and content == b"".join(MESSAGE.raw())
    (waits,) = deliver(agent(tmp_path / "none", mx), "postmaster@abc.test")
    assert (waits.status, waits.text) == (Status.TEMPORARY, "4.3.0 no hand-off channel here")


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (Answer(Status.DELIVERED, "2.0.0 delivered to the mailbox of root"), Status.DELIVERED),
        (Answer(Status.TEMPORARY, "4.2.0 the mailbox of root is locked"), Status.TEMPORARY),
    ],
)
def test_the_hosts_users_mail_is_handed_to_their_mailboxes(
    tmp_path: Path, answer: Answer, status: Status
) -> None:
    host = dataclasses.replace(
        TENANT, domain="abc.test", users=(), aliases=(("postmaster", ("root",)),)
    )
    handoffs = FakeHandoffs(answer)
    spool = Spool(tmp_path / "spool")
    spool.create()
    local = for_host(host, ["root", "alice"], spool, handoffs)  # type: ignore[arg-type]
    assert local.is_local("root@abc.test") and not local.is_local("root@bcd.test")
    (outcome,) = deliver(local, "PostMaster@abc.test")
    assert (outcome.status, outcome.text) == (status, answer.text)
    ((request, content),) = handoffs.given
    assert request == Request(MAILBOX, "root", "carol@bcd.test")
    assert content.startswith(
        b"Return-Path: <carol@bcd.test>\r\nDelivered-To: PostMaster@abc.test\r\n"
    )
