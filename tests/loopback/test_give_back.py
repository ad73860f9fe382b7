"""Mail taken in that can be sent nowhere goes back to its sender: a real worker (see
tests/loopback/test_worker.py) bounces a -t queue file whose header names no recipient,
or that it cannot complete, and quarantines it; accepted mail never ends as only a log
line."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dns_servers import DNSStack, dns_stack
from loopback_tenant import ZONE
from mailboxes import delivery_status, mailbox
from polling import wait_for
from smtp_servers import Recorder, smtp_server
from workers import start_worker, stop

from nsmail.core.queuefile import Envelope, encode
from nsmail.submit import maildrop
from nsmail.tenant.spool import CORRUPT, INCOMING, SPOOL_IN_HOME, Spool, new_queue_id


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSStack]:
    with dns_stack(ZONE) as stack:
        yield stack


@pytest.fixture
def worker_home(dns: DNSStack, tmp_path: Path) -> Iterator[tuple[Spool, Path]]:
    spool = Spool(tmp_path / SPOOL_IN_HOME)
    spool.create()
    home = spool.root.parents[2]
    with smtp_server(Recorder()) as port:
        pid = start_worker(dns, home, port)
        try:
            yield spool, home
        finally:
            assert stop(pid) == 0


def drop(spool: Spool, body: bytes, *, sender: str = "alice@tenant.test") -> str:
    """A -t queue file as a tenant's user could write it by hand."""
    queue_id = new_queue_id(time.time())
    envelope = Envelope(sender, (), arrival=time.time(), submitter="alice", extract=True)
    maildrop.drop(str(spool.root), queue_id, [encode(envelope, body)], 0o600)
    return queue_id


@pytest.mark.parametrize(
    ("body", "status", "why"),
    [
        (b"Subject: no To\n\nhi\n", "5.1.0", "no recipient addresses found in header"),
        (b"To: undisclosed-recipients:;\n\nhi\n", "5.1.0", "found in header"),
        (b"To: a@\n\nhi\n", "5.6.0", "headers cannot be completed"),
    ],
    ids=["no-to", "empty-group", "malformed-to"],
)
def test_a_message_that_can_go_nowhere_is_bounced_and_quarantined(
    worker_home: tuple[Spool, Path], body: bytes, status: str, why: str
) -> None:
    # -t, as sendmail would have refused each: the worker finds no recipient to send to.
    spool, home = worker_home
    queue_id = drop(spool, body)
    wait_for(lambda: spool.ids(CORRUPT) == [queue_id] and mailbox(home, "alice"))
    (report,) = mailbox(home, "alice")  # the sender is a local user: her Maildir
    assert report["Return-Path"] == "<>"
    (fields,) = delivery_status(report)
    assert (fields["Final-Recipient"], fields["Action"], fields["Status"]) == (
        "rfc822; unknown",
        "failed",
        status,
    )
    assert why in fields["Diagnostic-Code"]
    assert b"\nhi" in report.as_bytes()  # the message itself is returned


def test_null_sender_mail_that_can_go_nowhere_is_only_quarantined(
    worker_home: tuple[Spool, Path],
) -> None:
    spool, home = worker_home
    silent = drop(spool, b"Subject: no To\n\nhi\n", sender="")
    # Taken in after it: its bounce is queued, then delivered, after any bounce of the first.
    bounced = drop(spool, b"Subject: no To\n\nhi\n")
    wait_for(lambda: spool.ids(CORRUPT) == sorted([silent, bounced]) and mailbox(home, "alice"))
    (report,) = mailbox(home, "alice")
    assert bounced in report.as_string() and silent not in report.as_string()
    assert spool.ids(INCOMING) == []
