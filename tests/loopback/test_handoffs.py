"""Hand-offs across a jail, piece by piece on real files and sockets: the worker's side
(nsmail.tenant.handoff), the supervisor's checks (nsmail.root.handoff and its loop), and
the two children's work (nsmail.host.mailbox, nsmail.host.postmaster) in a directory of
the test's own. The whole path, jails included, runs in tests/e2e/test_routing_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import mailbox
import os
import selectors
import socket
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from nsmail.core.config import Config, DeliveryConfig, HostConfig, NetworkConfig, Tenant
from nsmail.core.handoff import MAILBOX, POSTMASTER, Answer, Request, encode_request
from nsmail.core.outcome import Status
from nsmail.core.queuefile import decode
from nsmail.host import mailbox as writer
from nsmail.host import postmaster
from nsmail.root import handoff
from nsmail.root.handoff import InFlight
from nsmail.root.supervisor import Relay, Slot, Supervisor
from nsmail.submit.maildrop import create
from nsmail.tenant.handoff import Handoffs

NOW = datetime(2024, 6, 4, 10, 0, tzinfo=UTC)
MESSAGE = b"Return-Path: <root@abc.test>\r\nSubject: cron\r\n\r\nFrom the job\r\n"


OPENED: list[int] = []  # descriptors the tests made, closed after each


@pytest.fixture(autouse=True)
def closed_after() -> Iterator[None]:
    yield
    while OPENED:
        with contextlib.suppress(OSError):
            os.close(OPENED.pop())


def message_file(tmp_path: Path, data: bytes = MESSAGE) -> int:
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, data)
    OPENED.append(fd)
    return fd


def answer_pair() -> tuple[int, int]:
    """(the worker's end, the end that travels with the request) of an answer socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ends = (mine.detach(), theirs.detach())
    OPENED.extend(ends)
    return ends


@pytest.fixture
def in_spool(tmp_path: Path) -> Iterator[Path]:
    """The working directory is a mail spool, as in the writer's jail."""
    spool = tmp_path / "mail"
    spool.mkdir()
    before = os.getcwd()
    os.chdir(spool)
    yield spool
    os.chdir(before)


def read_mbox(path: Path) -> list[Any]:
    box = mailbox.mbox(path)
    try:
        return list(box)
    finally:
        box.close()


# -- the mailbox writer -----------------------------------------------------------------


def test_the_writer_appends_entries_that_mbox_readers_read(in_spool: Path, tmp_path: Path) -> None:
    content = message_file(tmp_path)
    for _ in range(2):
        text = writer.deliver("root", "root@abc.test", content, NOW)
        assert text == "2.0.0 delivered to the mailbox of root"
    box = in_spool / "root"
    assert stat.S_IMODE(box.stat().st_mode) == 0o600
    assert box.read_bytes().startswith(b"From root@abc.test Tue Jun  4 10:00:00 2024\n")
    messages = read_mbox(box)
    assert [m["Subject"] for m in messages] == ["cron", "cron"]
    assert messages[0].get_payload() == ">From the job\n"
    assert not (in_spool / "root.lock").exists()


def test_a_locked_mailbox_waits_and_a_stale_dot_lock_is_broken(
    in_spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "LOCK_TRIES", 2)
    monkeypatch.setattr(writer.time, "sleep", lambda seconds: None)
    content = message_file(tmp_path)
    (in_spool / "root.lock").write_text("4242\n")
    text = writer.deliver("root", "", content, NOW)
    assert text == "4.2.0 the mailbox of root is locked; try again later"
    assert not (in_spool / "root").exists() or (in_spool / "root").stat().st_size == 0
    old = time.time() - writer.STALE_LOCK - 10
    os.utime(in_spool / "root.lock", (old, old))
    assert writer.deliver("root", "", content, NOW).startswith("2.0.0 ")


def test_an_fcntl_lock_held_elsewhere_is_waited_for(
    in_spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mutt and mail(1) take an fcntl lock too; another process holds one here."""
    monkeypatch.setattr(writer, "LOCK_TRIES", 2)
    monkeypatch.setattr(writer.time, "sleep", lambda seconds: None)
    (in_spool / "root").touch(mode=0o600)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    holder = os.fork()
    if holder == 0:
        import fcntl

        with open(in_spool / "root", "r+b") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            os.write(ready_w, b"x")
            os.read(done_r, 1)  # until the test is done
        os._exit(0)
    try:
        os.read(ready_r, 1)
        text = writer.deliver("root", "", message_file(tmp_path), NOW)
        assert text == "4.2.0 the mailbox of root is locked; try again later"
        assert (in_spool / "root").stat().st_size == 0
    finally:
        os.write(done_w, b"x")
        os.waitpid(holder, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hard link", "owner"])
def test_a_mailbox_that_is_not_its_owners_plain_file_is_not_written(
    in_spool: Path, tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    box = in_spool / "root"
    if kind == "symlink":
        box.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(box)
    elif kind == "hard link":
        os.link(target, box)
    else:
        box.touch()
        os.chown(box, 65534, 65534)
    text = writer.deliver("root", "", message_file(tmp_path), NOW)
    assert text.startswith("4.2.0 the mailbox of root: ")
    assert target.read_bytes() == b""
    if kind in ("hard link", "owner"):
        assert box.stat().st_size == 0


def test_a_write_that_fails_half_way_leaves_the_mailbox_as_it_was(
    in_spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = message_file(tmp_path)
    writer.deliver("root", "", content, NOW)
    before = (in_spool / "root").read_bytes()

    def full_disk(fd: int, pieces: Any) -> None:
        os.write(fd, b"From half a message\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_pieces", full_disk)
    text = writer.deliver("root", "", content, NOW)
    assert text == "4.3.1 the mailbox of root: No space left on device"
    assert (in_spool / "root").read_bytes() == before


# -- the postmaster's drop --------------------------------------------------------------


def test_the_postmasters_drop_queues_for_the_host_with_the_null_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "hostspool"
    create(str(spool), public_maildrop=True)
    monkeypatch.chdir(spool)
    content = message_file(tmp_path, b"Subject: double bounce\r\n\r\n...\r\n")
    text = postmaster.drop("abc.test", 1000, content, 1.7e9)
    (queue_id,) = os.listdir(spool / "maildrop")
    assert text == f"2.0.0 queued for the postmaster of abc.test as {queue_id}"
    envelope, body = decode((spool / "maildrop" / queue_id).read_bytes())
    assert (envelope.sender, envelope.recipients) == ("", ("postmaster@abc.test",))
    assert body == b"Subject: double bounce\r\n\r\n...\r\n"
    assert postmaster.drop("abc.test", 10, content, 1.7e9).startswith("5.3.4 over the 10 bytes")


# -- the supervisor's side --------------------------------------------------------------

TENANT = Tenant(
    "bcd.test", IPv4Address("198.51.100.70"), None, "bcd.test", 4000, 4000, Path("/"), (), "test"
)
HOST = dataclasses.replace(TENANT, domain="abc.test", ipv4=None, source="[host]")


def host_config(tmp_path: Path) -> HostConfig:
    spool = tmp_path / "var-mail"
    spool.mkdir(exist_ok=True)
    os.chown(spool, 0, 8)
    return HostConfig(
        "abc.test",
        (),
        "nsmail",
        990,
        990,
        "nsmail-dns",
        991,
        991,
        tmp_path,
        tmp_path / "hs",
        mail_spool=spool,
    )


def request_fds(tmp_path: Path) -> tuple[list[int], int]:
    """The descriptors of a request, and the worker's end of its answer socket."""
    mine, theirs = answer_pair()
    return [message_file(tmp_path), theirs], mine


def test_the_plan_jails_each_child_as_the_one_who_may_write(tmp_path: Path) -> None:
    host = host_config(tmp_path)
    fds, _ = request_fds(tmp_path)
    job = handoff.plan(encode_request(Request(MAILBOX, "root", "")), fds, HOST, host, 0)
    assert isinstance(job, handoff.Job)
    assert (job.identity.uid, job.identity.gid, job.identity.root) == (0, 8, host.mail_spool)
    job = handoff.plan(encode_request(Request(POSTMASTER, "", "")), fds, TENANT, host, 0)
    assert isinstance(job, handoff.Job)
    assert (job.identity.uid, job.identity.gid, job.identity.root) == (990, 990, host.spool)


@pytest.mark.parametrize(
    ("request_", "worker", "answer"),
    [
        (Request(MAILBOX, "root", ""), TENANT, "4.3.0 only the host's worker writes mailboxes"),
        (Request(POSTMASTER, "", ""), HOST, "4.3.0 the host's worker queues its postmaster"),
        (Request(MAILBOX, "nosuchuser9", ""), HOST, "5.1.1 no such user here: nosuchuser9"),
    ],
    ids=["tenant mailbox", "host postmaster", "unknown user"],
)
def test_the_plan_refuses_what_the_worker_may_not_ask(
    tmp_path: Path, request_: Request, worker: Tenant, answer: str
) -> None:
    fds, _ = request_fds(tmp_path)
    job = handoff.plan(encode_request(request_), fds, worker, host_config(tmp_path), 0)
    assert isinstance(job, str) and job.startswith(answer)


def test_a_request_without_its_two_descriptors_is_refused(tmp_path: Path) -> None:
    fds, mine = request_fds(tmp_path)
    data = encode_request(Request(POSTMASTER, "", ""))
    for wrong in ([], fds[:1], [fds[1], fds[0]]):
        assert handoff.plan(data, wrong, TENANT, host_config(tmp_path), 0) == (
            "4.3.0 a hand-off comes with a message file and an answer socket"
        )
    handoff.refuse(fds, "4.3.0 no")
    assert os.read(mine, 100) == b"4.3.0 no"


class FakeZygote:
    """Takes the child's request as the zygote would, with copies of its descriptors."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, list[int]]] = []

    def request(
        self, title: str, identity: Any, netns: Any, fds: list[int], target: Any, done: Any
    ) -> None:
        self.asked.append((title, [os.dup(fd) for fd in fds]))
        OPENED.extend(self.asked[-1][1])
        done(10_000 + len(self.asked))


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[Supervisor, Slot, socket.socket, FakeZygote]]:
    """The supervisor's hand-off path for a tenant's slot, fed through a real socketpair."""
    supervisor = Supervisor.__new__(Supervisor)
    supervisor.selector = selectors.DefaultSelector()
    supervisor.relay = Relay()
    zygote = FakeZygote()
    supervisor.zygote = zygote  # type: ignore[assignment]
    supervisor.handing_off = InFlight()
    network = NetworkConfig("routed", None, None, None, "nsm")
    supervisor.config = Config(tmp_path, host_config(tmp_path), network, DeliveryConfig(), ())
    slot = Slot(TENANT)
    worker, slot.handoffs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    slot.handoffs.setblocking(False)
    supervisor.selector.register(slot.handoffs, selectors.EVENT_READ, None)
    supervisor.slots = {TENANT.domain: slot}
    yield supervisor, slot, worker, zygote
    worker.close()
    slot.handoffs.close()


def ask(worker: socket.socket, tmp_path: Path, request: Request) -> int:
    fds, mine = request_fds(tmp_path)
    socket.send_fds(worker, [encode_request(request)], fds)
    return mine


def test_the_supervisor_starts_a_child_per_request_and_at_most_four_at_once(
    supervised: tuple[Supervisor, Slot, socket.socket, FakeZygote], tmp_path: Path
) -> None:
    supervisor, slot, worker, zygote = supervised
    answers = [ask(worker, tmp_path, Request(POSTMASTER, "", "")) for _ in range(5)]
    supervisor._on_handoff(slot)
    assert [title for title, _ in zygote.asked] == ["nsmail postmaster bcd.test"] * 4
    assert os.read(answers[4], 200) == b"4.3.2 4 hand-offs are under way; try again later"
    assert supervisor.handing_off.ended(10_001) and not supervisor.handing_off.ended(10_001)
    supervisor._on_handoff(slot)  # nothing more came: nothing happens
    answers.append(ask(worker, tmp_path, Request(POSTMASTER, "", "")))
    supervisor._on_handoff(slot)  # room for one again
    assert len(zygote.asked) == 5
    refused = ask(worker, tmp_path, Request(MAILBOX, "root", ""))
    supervisor._on_handoff(slot)
    assert os.read(refused, 200) == b"4.3.0 only the host's worker writes mailboxes"
    worker.close()
    supervisor._on_handoff(slot)  # the worker went: its channel is no longer watched
    assert slot.handoffs not in [key.fileobj for key in supervisor.selector.get_map().values()]


# -- the worker's side ------------------------------------------------------------------


def test_the_worker_hands_off_a_file_and_takes_the_childs_answer(tmp_path: Path) -> None:
    mine, supervisor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handoffs = Handoffs(mine, tmp_path)

    async def run() -> tuple[Answer, Answer]:
        answered = asyncio.create_task(
            handoffs.hand_off(Request(MAILBOX, "root", "x@y.test"), [b"hi"])
        )
        silent = asyncio.create_task(handoffs.hand_off(Request(MAILBOX, "root", ""), [b"ho"]))
        loop = asyncio.get_running_loop()
        for task_answer in (b"2.0.0 delivered to the mailbox of root", None):
            _, fds, _, _ = await loop.run_in_executor(
                None, socket.recv_fds, supervisor_end, 1024, 2
            )
            content, answer = fds
            assert os.pread(content, 10, 0) == (b"hi" if task_answer else b"ho")
            if task_answer is not None:
                os.write(answer, task_answer)
            os.close(content)
            os.close(answer)  # a child that dies says nothing
        return await answered, await silent

    answered, silent = asyncio.run(run())
    assert answered == Answer(Status.DELIVERED, "2.0.0 delivered to the mailbox of root")
    assert silent == Answer(Status.TEMPORARY, "4.3.0 the hand-off ended without an answer")
    supervisor_end.close()
    gone = asyncio.run(handoffs.hand_off(Request(POSTMASTER, "", ""), [b"x"]))
    assert gone.status == Status.TEMPORARY and gone.text.startswith("4.3.0 cannot hand")
    assert os.listdir(tmp_path) == []  # the message files had no name
    mine.close()
