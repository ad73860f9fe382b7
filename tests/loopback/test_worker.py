"""The worker end to end: pick-up and clean-up, delivery, deferral, bounces, local mail.

A real worker process (prepare, chroot into the tenant home when root, serve) delivers to
a real aiosmtpd server on loopback, with DNS through the real relay.
"""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dns_servers import DNSStack, dns_stack
from loopback_tenant import ZONE, make_tenant
from mailboxes import delivery_status, mailbox
from polling import wait_for
from smtp_servers import Recorder, smtp_server
from workers import BODY, start_worker, stop, submit

from nsmail.core.config import DeliveryConfig
from nsmail.core.queuefile import Envelope, decode, encode
from nsmail.tenant import worker
from nsmail.tenant.spool import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    INCOMING,
    MAILDROP,
    SPOOL_IN_HOME,
    Spool,
    new_queue_id,
)


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSStack]:
    with dns_stack(ZONE) as stack:
        yield stack


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / SPOOL_IN_HOME)
    spool.create()
    return spool


def deferred(spool: Spool, queue_id: str) -> Envelope:
    return decode(spool.path(DEFERRED, queue_id).read_bytes())[0]


@pytest.fixture(params=[False], ids=["own-senders"])
def running(
    dns: DNSStack, spool: Spool, request: pytest.FixtureRequest
) -> Iterator[tuple[Recorder, Path]]:
    recorder = Recorder(
        rcpt_replies={"later": "451 4.3.0 try later", "nobody": "550 5.1.1 no such user"}
    )
    home = spool.root.parents[2]
    with smtp_server(recorder) as port:
        pid = start_worker(dns, home, port, foreign_senders=request.param)
        try:
            yield recorder, home
        finally:
            assert os.waitstatus_to_exitcode(stop(pid)) == 0


def test_submitted_mail_is_completed_and_delivered(
    running: tuple[Recorder, Path], spool: Spool
) -> None:
    recorder, _ = running
    submit(spool, ("a@rcpt.test",))  # only inotify wakes the worker: the scan is an hour away
    wait_for(lambda: recorder.received)
    message = email.message_from_bytes(recorder.received[0].content)
    assert message["From"] == "alice@tenant.test"
    assert message["Message-ID"].endswith("@tenant.test>")
    assert message["Date"]
    assert recorder.received[0].peer == "127.0.0.5"
    assert recorder.received[0].ehlo == "mail.tenant.test"
    wait_for(lambda: not any(spool.ids(s) for s in (MAILDROP, INCOMING, ACTIVE, DEFERRED)))


def test_damaged_files_are_quarantined_and_the_rest_goes_on(
    running: tuple[Recorder, Path], spool: Spool
) -> None:
    recorder, _ = running
    spool.put(MAILDROP, "torn", [b"NSMAIL-QUEUE 1\ntorn"])
    submit(spool, ("a@rcpt.test",))
    wait_for(lambda: spool.ids(CORRUPT) == ["torn"] and recorder.received)


def test_mixed_outcomes_defer_bounce_and_deliver(
    running: tuple[Recorder, Path], spool: Spool
) -> None:
    recorder, home = running
    queue_id = submit(spool, ("b@rcpt.test", "later@rcpt.test", "nobody@rcpt.test"))
    wait_for(lambda: spool.ids(DEFERRED) == [queue_id])
    assert recorder.received[0].recipients == ["b@rcpt.test"]
    envelope = deferred(spool, queue_id)
    assert envelope.recipients == ("later@rcpt.test",) and envelope.attempts == 1
    # Why it waits, for `nsmail queue`: the reply, its code and the server that gave it.
    (why,) = envelope.deferrals
    assert (why.recipient, why.status, why.code, why.text) == (
        "later@rcpt.test",
        "4.3.0",
        451,
        "4.3.0 try later (in reply to RCPT TO)",
    )
    assert why.relay.startswith("mx.rcpt.test[127.0.0.1]:") and why.at > envelope.arrival
    next_attempt = spool.next_attempt(queue_id, float("inf"))
    assert next_attempt is not None and next_attempt > time.time() + 60
    # The bounce for nobody@ went to the sender, a local user: her Maildir.
    wait_for(lambda: mailbox(home, "alice"))
    (report,) = mailbox(home, "alice")
    assert report["Return-Path"] == "<>"
    (fields,) = delivery_status(report)
    assert (fields["Final-Recipient"], fields["Action"], fields["Status"]) == (
        "rfc822; nobody@rcpt.test",
        "failed",
        "5.1.1",
    )
    # A flush (sendmail -q) retries deferred mail at once.
    recorder.rcpt_replies.pop("later")
    spool.request_flush()
    wait_for(lambda: len(recorder.received) == 2)
    assert recorder.received[-1].recipients == ["later@rcpt.test"]
    wait_for(lambda: not spool.ids(DEFERRED) and not spool.ids(ACTIVE))


def notice_text(report: email.message.EmailMessage) -> str:
    part = next(p for p in report.walk() if p.get_content_type() == "text/plain")
    assert isinstance(part, email.message.EmailMessage)
    return " ".join(part.get_content().split())


def test_expiry_is_nsmails_decision_quoting_the_last_reply(
    running: tuple[Recorder, Path], spool: Spool
) -> None:
    _, home = running
    old = Envelope("alice@tenant.test", ("later@rcpt.test",), arrival=time.time() - 6 * 86400)
    spool.put(MAILDROP, new_queue_id(time.time()), [encode(old, BODY)])
    wait_for(lambda: mailbox(home, "alice"))
    (report,) = mailbox(home, "alice")
    # RFC 3464 2.3.5, 2.3.6: no server said "expired"; what one said last is only quoted.
    (fields,) = delivery_status(report)
    assert "Remote-MTA" not in fields and "Diagnostic-Code" not in fields
    assert (fields["Action"], fields["Status"]) == ("failed", "4.4.7")
    text = notice_text(report)
    assert "<later@rcpt.test>: 4.4.7 message expired in the queue; last error: " in text
    assert "mx.rcpt.test[127.0.0.1]" in text and "said: 451 4.3.0 try later" in text


def test_a_refusal_nsmail_made_itself_bounces_without_a_remote_reply(
    dns: DNSStack, spool: Spool
) -> None:
    recorder = Recorder()
    home = spool.root.parents[2]
    with smtp_server(recorder, enable_SMTPUTF8=False) as port:
        pid = start_worker(dns, home, port)
        try:
            submit(spool, ("jörg@rcpt.test",))
            wait_for(lambda: mailbox(home, "alice"))
        finally:
            assert os.waitstatus_to_exitcode(stop(pid)) == 0
    (report,) = mailbox(home, "alice")
    (fields,) = delivery_status(report)
    assert "Remote-MTA" not in fields and "Diagnostic-Code" not in fields
    assert fields["Status"] == "5.6.7"
    text = notice_text(report)
    assert "said" not in text
    relay = f"mx.rcpt.test[127.0.0.1]:{port}"
    assert f"5.6.7 {relay}: the addresses need SMTPUTF8, which the server does not offer" in text
    assert recorder.rcpt_attempts == []


def test_null_sender_mail_never_bounces_but_tells_the_hosts_postmaster(
    running: tuple[Recorder, Path], spool: Spool
) -> None:
    """No bounce of a bounce; a notice to the host's postmaster, which this worker (with
    no hand-off channel to the supervisor) keeps deferred."""
    recorder, home = running
    submit(spool, ("nobody@rcpt.test",), sender="")
    submit(spool, ("a@rcpt.test",))
    wait_for(lambda: len(recorder.received) == 1)
    wait_for(lambda: not spool.ids(INCOMING) and not spool.ids(ACTIVE) and spool.ids(DEFERRED))
    assert mailbox(home, "alice") == []
    (notice,) = spool.ids(DEFERRED)
    envelope, _ = decode(spool.path(DEFERRED, notice).read_bytes())
    assert (envelope.sender, envelope.recipients) == ("", ("postmaster@abc.test",))
    assert "no hand-off channel" in envelope.deferrals[0].text


def test_a_sender_outside_the_domain_is_quarantined(
    running: tuple[Recorder, Path], spool: Spool
) -> None:
    # sendmail refuses it; a tenant writing its spool directly must not get past the worker.
    recorder, _ = running
    queue_id = submit(spool, ("a@rcpt.test",), sender="ceo@bank.test")
    wait_for(lambda: spool.ids(CORRUPT) == [queue_id])
    assert recorder.received == []


@pytest.mark.parametrize("running", [True], indirect=True, ids=["foreign-senders"])
def test_local_recipients_go_to_maildirs(running: tuple[Recorder, Path], spool: Spool) -> None:
    recorder, home = running
    submit(spool, ("Alice@tenant.test", "ghost@tenant.test"), sender="x@rcpt.test")
    wait_for(lambda: mailbox(home, "alice") and recorder.received)
    (delivered,) = mailbox(home, "alice")
    assert delivered["Delivered-To"] == "Alice@tenant.test"
    assert delivered["Subject"] == "hi"
    # ghost@ is nobody here: the bounce went out to the remote sender.
    bounce = email.message_from_bytes(recorder.received[0].content, policy=email.policy.default)
    assert recorder.received[0].sender == "<>"  # aiosmtpd shows the null sender so
    assert recorder.received[0].recipients == ["x@rcpt.test"]
    assert delivery_status(bounce)[0]["Final-Recipient"] == "rfc822; ghost@tenant.test"
    assert delivery_status(bounce)[0]["Status"] == "5.1.1"


def test_mail_left_active_by_a_crash_is_retried(dns: DNSStack, spool: Spool) -> None:
    recorder = Recorder()
    envelope = Envelope("alice@tenant.test", ("a@rcpt.test",), arrival=time.time(), cleaned=True)
    spool.put(ACTIVE, "crashed", [encode(envelope, b"Subject: x\r\n\r\nhi\r\n")])
    with smtp_server(recorder) as port:
        pid = start_worker(dns, spool.root.parents[2], port)
        try:
            wait_for(lambda: recorder.received)
        finally:
            stop(pid)
    assert not spool.ids(ACTIVE) and not spool.ids(INCOMING)


@pytest.mark.needs("root")  # mounts a small file system
def test_a_full_disk_mid_attempt_loses_nothing(dns: DNSStack, spool: Spool) -> None:
    """The disk fills between taking a message and settling it: neither the bounce nor
    the rewrite for the deferred recipient can be written. The message must wait in
    deferred/ as it was (not stuck in active/), and settle once there is room again."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", spool.root], check=True)
    try:
        spool.create()
        queue_id = submit(spool, ("b@rcpt.test", "later@rcpt.test", "nobody@rcpt.test"))
        filler = spool.root / "filler"
        with pytest.raises(OSError, match="No space left"), filler.open("wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        recorder = Recorder(
            rcpt_replies={"later": "451 4.3.0 try later", "nobody": "550 5.1.1 no such user"}
        )
        home = spool.root.parents[2]
        with smtp_server(recorder) as port:
            pid = start_worker(dns, home, port)
            try:
                wait_for(lambda: spool.ids(DEFERRED) == [queue_id])
                assert not spool.ids(ACTIVE) and not spool.ids(INCOMING)
                envelope = deferred(spool, queue_id)
                assert len(envelope.recipients) == 3 and envelope.attempts == 0  # as it was
                filler.unlink()
                spool.request_flush()
                wait_for(lambda: mailbox(home, "alice"))  # the bounce, written at last
                (report,) = mailbox(home, "alice")
                assert [f["Final-Recipient"] for f in delivery_status(report)] == [
                    "rfc822; nobody@rcpt.test"
                ]
                wait_for(lambda: deferred(spool, queue_id).attempts == 1)
                assert deferred(spool, queue_id).recipients == ("later@rcpt.test",)
                # b@ was sent in both attempts: a duplicate is allowed, a loss never.
                assert [m.recipients for m in recorder.received] == [["b@rcpt.test"]] * 2
            finally:
                assert os.waitstatus_to_exitcode(stop(pid)) == 0
    finally:
        subprocess.run(["umount", spool.root], check=True)


def test_a_deferred_file_dated_far_ahead_is_due_within_the_largest_backoff(
    dns: DNSStack, spool: Spool
) -> None:
    """The tenant's user dates a file in its deferred/ 30 days ahead: the worker counts it
    due within the largest backoff (the next due time it reports and wakes for), and a
    file dated far in the past is simply due now."""
    home = spool.root.parents[2]
    config = DeliveryConfig(retry_max=4000)
    tenant = make_tenant(home)
    queue = worker.prepare(tenant, config, dns.channel(), home=home, host_name="abc.test").queue
    ahead, past = new_queue_id(time.time()), new_queue_id(time.time())
    for queue_id, when in ((ahead, time.time() + 30 * 86400), (past, 1.0)):
        spool.put(DEFERRED, queue_id, [b"planted"])
        spool.schedule(queue_id, DEFERRED, when)
    before = time.time()
    assert queue.due() == [past]
    assert before < queue.next_due <= time.time() + 4000 * 1.1
    assert queue.report("asleep", time.time()).next_due == queue.next_due
    assert queue.take(DEFERRED, past) is None
    assert spool.ids(CORRUPT) == [past]  # it was tried (and, being no queue file, kept)
