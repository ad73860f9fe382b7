"""Upgrade safety: a queue left by the first release (queue format version 1) delivers.

The files in `tests/support/data/queue-v1/` were written by release 1's `queuefile.encode`: one
as its sendmail left it in maildrop, one deferred after three attempts with its headers
completed. They go into a tenant's queue with the tenant's ownership, as an upgrade in
place would find them, and the current worker must deliver both to a real Postfix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosting import DUAL, Hosting, dns_records
from lab import Lab, Nsd, Postfix

from nsmail.tenant.spool import DEFERRED, MAILDROP, SPOOL_IN_HOME

V1_FILES = Path(__file__).parents[1] / "support" / "data" / "queue-v1"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def place(hosting: Hosting, state: str, queue_id: str, data: bytes, mtime: float) -> None:
    path = hosting.home(DUAL.domain) / SPOOL_IN_HOME / state / queue_id
    tmp = path.with_name("." + queue_id)  # a dot name the worker skips until the rename
    tmp.write_bytes(data)
    uid = hosting.uid(DUAL.domain)
    os.chown(tmp, uid, uid)
    tmp.chmod(0o600)
    os.utime(tmp, (mtime, mtime))
    tmp.rename(path)


def test_a_queue_written_by_release_1_still_delivers(lab: Lab) -> None:
    Nsd(lab, dns_records((DUAL,)))
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), scan_interval=0.5)
    hosting.start()
    hosting.wait_status(lambda s: s[DUAL.domain]["state"] == "idle")

    now = time.time()
    place(hosting, DEFERRED, "0000000000000001v1", (V1_FILES / "deferred").read_bytes(), now - 1)
    place(hosting, MAILDROP, "0000000000000002v1", (V1_FILES / "fresh").read_bytes(), now)

    received = postfix.wait_for(3, timeout=30)
    by_subject = sorted((str(m["Subject"]), str(m["Delivered-To"])) for m in received)
    assert by_subject == [
        ("deferred by release 1", "bob@rcpt.test"),
        ("written by release 1", "bob@rcpt.test"),
        ("written by release 1", "carol@rcpt.test"),
    ]
    for message in received:
        assert str(message["Message-ID"]).endswith("@bcd.test>")
        assert " ".join(str(message["Received"]).split()).startswith(
            "from bcd.test (bcd.test [IPv6:2001:db8:51::70])"
        )
    assert "corrupt" not in hosting.log()
    assert hosting.stop() == 0
