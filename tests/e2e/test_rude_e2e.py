"""Reliability of the mail path against a rude receiver: nothing is lost, nothing is stuck.

Two tenants' real workers deliver 200 messages to `rude_smtp` (421 greetings, 4xx and
5xx at RCPT, 552 after the dot, dropped connections before DATA and after the dot,
stalls past the timeout, garbage replies), with retries every second or two and a queue
lifetime short enough that expiry bounces happen within the test. Every (message,
recipient) must end delivered (in the receiver's log), bounced (a DSN in the sender's
own Maildir naming it), or still queued; never lost, never acknowledged and then sent
again. The seed is printed; NSMAIL_RUDE_SEED replays one.
"""

from __future__ import annotations

import email
import email.policy
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from hosting import DUAL, V4_ONLY, Hosting, TenantSpec, dns_records
from lab import Lab, Nsd
from rude_smtp import RudeSmtp

from nsmail.core.queuefile import decode
from nsmail.tenant.spool import ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, MAILDROP, SPOOL_IN_HOME

TENANTS = (DUAL, V4_ONLY)
MESSAGES = 200
SETTLE_TIMEOUT = 75.0
DELIVERY: dict[str, Any] = {
    "scan_interval": 0.5,
    "timeout": 2,
    "retry_first": 1,
    "retry_max": 2,
    "delay_warning": 8,
    "lifetime": 20,
}
STALL = 3.0  # longer than the client's timeout
# States of a worker process that is up: "running" until its first report, then its own.
LIVE = ("running", "idle", "delivering", "backing off")

Pair = tuple[str, str]  # (Message-ID, recipient)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@dataclass(frozen=True)
class Notice:
    """One DSN found in a sender's Maildir."""

    message_id: str  # of the returned original
    action: str  # "failed" or "delayed"
    recipients: dict[str, str]  # Final-Recipient address -> Status


def submit(hosting: Hosting, run: str) -> dict[Pair, TenantSpec]:
    """Enqueue MESSAGES messages from alice of alternating tenants; every fourth has two
    recipients. Returns every (Message-ID, recipient) pair with its tenant."""
    pairs = {}
    for i in range(MESSAGES):
        tenant = TENANTS[i % len(TENANTS)]
        message_id = f"<rude-{i}-{run}@{tenant.domain}>"
        recipients = [f"r{i}@rcpt.test"] + ([f"s{i}@rcpt.test"] if i % 4 == 0 else [])
        body = (
            f"From: alice@{tenant.domain}\nTo: {', '.join(recipients)}\n"
            f"Subject: rude {i}\nMessage-ID: {message_id}\n\nmessage {i}\n"
        ).encode()
        hosting.enqueue(tenant.domain, f"alice@{tenant.domain}", recipients, body)
        hosting.drain_notify()
        pairs.update({(message_id, r): tenant for r in recipients})
    return pairs


def notices(hosting: Hosting, tenant: TenantSpec) -> list[Notice]:
    new = hosting.home(tenant.domain) / "mail" / "alice" / "new"
    paths = sorted(new.iterdir()) if new.is_dir() else []
    return [_notice(p) for p in paths]


def _notice(path: Path) -> Notice:
    report = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    assert report.get_content_type() == "multipart/report", path
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks: list[Message] = status.get_payload()  # type: ignore[assignment]
    recipients = {
        str(block["Final-Recipient"]).partition(";")[2].strip(): str(block["Status"])
        for block in blocks[1:]
    }
    actions = {str(block["Action"]) for block in blocks[1:]}
    assert len(actions) == 1, f"{path}: mixed actions {actions}"
    return Notice(_returned_message_id(report), actions.pop(), recipients)


def _returned_message_id(report: EmailMessage) -> str:
    for part in report.walk():
        if part.get_content_type() == "message/rfc822":
            payload: list[Message] = part.get_payload()  # type: ignore[assignment]
            (original,) = payload
            return str(original["Message-ID"])
        if part.get_content_type() == "text/rfc822-headers":
            headers = email.message_from_string(part.get_content())
            return str(headers["Message-ID"])
    raise AssertionError("a DSN without the returned message")


def queued(hosting: Hosting, tenants: tuple[TenantSpec, ...]) -> dict[str, dict[Pair, float]]:
    """Pairs still in each spool state; the value is the file's mtime (next attempt)."""
    found: dict[str, dict[Pair, float]] = {}
    for tenant in tenants:
        spool = hosting.home(tenant.domain) / SPOOL_IN_HOME
        for state in (MAILDROP, INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT):
            for path in (spool / state).glob("*") if (spool / state).is_dir() else ():
                try:
                    raw = path.read_bytes()
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue  # moved on meanwhile
                envelope, body = decode(raw)
                original = email.message_from_bytes(body)
                for recipient in envelope.recipients:
                    pair = (str(original["Message-ID"]), recipient)
                    found.setdefault(state, {})[pair] = mtime
    return found


def test_rude_receiver_loses_nothing(lab: Lab) -> None:
    seed = int(os.environ.get("NSMAIL_RUDE_SEED") or secrets.randbelow(1 << 30))
    print(f"seed {seed}")
    Nsd(lab, dns_records(TENANTS))
    server = RudeSmtp(lab, seed=seed, stall=STALL)
    hosting = Hosting(lab)
    hosting.write_config(TENANTS, **DELIVERY)
    hosting.start()
    # Hosting.enqueue writes through the spool's tmp/, which a starting worker empties.
    hosting.wait_status(lambda s: all(s[t.domain]["state"] in LIVE[1:] for t in TENANTS))
    started = time.monotonic()

    pairs = submit(hosting, secrets.token_hex(4))
    settled = False
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not settled and time.monotonic() < deadline:
        time.sleep(0.5)
        hosting.drain_notify()
        # A record without the 250 (dropped after the dot) leaves the client unsure: it
        # still holds the recipient, so only acknowledged ones are settled.
        acked = {
            (r["message_id"], to) for r in server.records() if r["acked"] for to in r["rcpt_to"]
        }
        bounced = {
            (n.message_id, to)
            for t in TENANTS
            for n in notices(hosting, t)
            if n.action == "failed"
            for to in n.recipients
        }
        settled = set(pairs) <= acked | bounced
    elapsed = time.monotonic() - started

    records = server.records()
    found = [n for t in TENANTS for n in notices(hosting, t)]
    spool = queued(hosting, TENANTS)
    now = time.time()
    received = Counter((r["message_id"], to) for r in records for to in r["rcpt_to"])
    acks = Counter((r["message_id"], to) for r in records if r["acked"] for to in r["rcpt_to"])
    bounces = Counter(
        (n.message_id, to) for n in found if n.action == "failed" for to in n.recipients
    )
    deferred = {p for p, when in spool.get(DEFERRED, {}).items() if when > now - 1}
    in_flight = {p for state in (MAILDROP, INCOMING, ACTIVE) for p in spool.get(state, {})}
    held = set(spool.get(HOLD, {}))  # over a sending limit: kept, not lost
    lost = [p for p in pairs if not (received[p] or bounces[p] or p in deferred | in_flight | held)]
    statuses = Counter(
        status for n in found if n.action == "failed" for status in n.recipients.values()
    )
    behaviours = Counter(r["behaviour"] for r in records)
    print(
        f"{len(pairs)} pairs in {elapsed:.1f} s: delivered {sum(1 for p in pairs if received[p])}"
        f", bounced {sum(1 for p in pairs if bounces[p])} {dict(statuses)}"
        f", deferred {len(deferred)}, in flight {len(in_flight)}, held {len(held)}"
        f", duplicates {sum(received.values()) - len(received)}"
        f", received and bounced {sum(1 for p in pairs if received[p] and bounces[p])}"
        f", delay warnings {sum(1 for n in found if n.action == 'delayed')}"
        f"; stored by behaviour {dict(behaviours)}"
    )
    context = f"seed {seed}\n{hosting.log()[-4000:]}"
    assert not lost, f"lost {lost}; {context}"
    assert not spool.get(CORRUPT), f"quarantined {spool[CORRUPT]}; {context}"
    # A 250 after the dot settles the recipient: sending it again is a bug, not ambiguity.
    assert not [p for p, n in acks.items() if n > 1], f"acknowledged twice; {context}"
    assert not [p for p in acks if bounces[p]], f"acknowledged and bounced; {context}"
    assert not [p for p, n in bounces.items() if n > 1], f"bounced twice; {context}"
    warnings = Counter(
        (n.message_id, to) for n in found if n.action == "delayed" for to in n.recipients
    )
    assert not [p for p, n in warnings.items() if n > 1], f"warned twice; {context}"
    assert {p for p in received if p not in pairs} == set(), "received mail never sent"
    assert settled, f"not settled in {SETTLE_TIMEOUT} s ({len(deferred)} deferred); {context}"
    # Everything settled, so the queues drain: nothing stays behind in any state.
    deadline = time.monotonic() + 10
    while any(queued(hosting, TENANTS).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        hosting.drain_notify()
    assert not any(queued(hosting, TENANTS).values()), f"left queued; {context}"
    hosting.drain_notify()
    workers = hosting.status()
    for tenant in TENANTS:
        worker = workers[tenant.domain]
        assert worker["state"] in LIVE and worker["restarts"] == 0, worker
    assert "Traceback" not in hosting.log(), context
    assert hosting.stop() == 0
