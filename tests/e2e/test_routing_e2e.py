"""Mail with nowhere to go is never lost (issue 16), end to end: root's cron mail in the
operator's mailbox, an "mx" tenant's contact form at its own MX, aliases and .forward,
loops stopped with a bounce, a double bounce at the postmaster's. The real supervisor,
workers, zygote and jailed hand-off children, a real Postfix and NSD, in a lab."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest
from hosting import DUAL, Hosting, TenantSpec, dns_records
from lab import DOMAINS, Lab, Nsd, Postfix
from mailboxes import delivery_status
from polling import wait_for

MX_TENANT = TenantSpec("fgh.test", "198.51.100.73", None, users=())


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def received_from(message: Any) -> str:
    return " ".join(str(message["Received"]).split())


def test_roots_cron_mail_arrives_where_the_operator_reads_it(lab: Lab) -> None:
    """Root's mail (no alias) and another user's go to their mbox in /var/mail, written as
    each mailbox's owner; an alias of /etc/aliases sends on to another machine."""
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.aliases.write_text("# the lab's /etc/aliases\nops: x1@rcpt.test\n")
    hosting.start()

    cron = b"Subject: Cron <root@abc> run-parts /etc/cron.daily\n\nFrom the job: done\n"
    hosting.sendmail(None, ["-i", "root"], cron, uid=0)
    hosting.sendmail(None, ["-i", "nobody", "ops"], b"Subject: for two\n\nhi\n", uid=0)

    wait_for(lambda: hosting.mbox("root") and hosting.mbox("nobody"), timeout=30)
    (message,) = hosting.mbox("root")
    assert message["Subject"] == "Cron <root@abc> run-parts /etc/cron.daily"
    assert message["Return-Path"] == "<root@abc.test>"
    assert message["Delivered-To"] == "root@abc.test"
    assert message.get_content().strip() == ">From the job: done"
    root_box, nobody_box = (hosting.mail_spool / name for name in ("root", "nobody"))
    assert root_box.read_bytes().startswith(b"From root@abc.test ")
    assert (root_box.stat().st_uid, stat.S_IMODE(root_box.stat().st_mode)) == (0, 0o600)
    assert nobody_box.stat().st_uid == 65534  # written as nobody: the mailbox's owner
    assert not list(hosting.mail_spool.glob("*.lock"))
    (forwarded,) = postfix.wait_for(1, timeout=30)
    assert forwarded["Subject"] == "for two" and forwarded["X-Original-To"] == "x1@rcpt.test"
    assert received_from(forwarded).startswith("from abc.test (abc.test [")
    assert hosting.stop() == 0


def test_a_contact_form_to_an_mx_tenants_own_domain_goes_to_its_mx(lab: Lab) -> None:
    """A domain whose mailboxes are at another provider: its web site's mail to its own
    address leaves by MX, from the tenant's address with its EHLO name."""
    Nsd(lab, [*dns_records((DUAL, MX_TENANT)), ("fgh.test", "MX", "10 mx.test")])
    postfix = Postfix(lab, domains=(*DOMAINS, "fgh.test"))
    hosting = Hosting(lab)
    hosting.write_config((DUAL, MX_TENANT))
    check = hosting.nsmail("check")
    assert check.returncode == 0, check.stderr
    assert 'fgh.test: local_delivery = "mx"' in check.stdout
    assert 'bcd.test: local_delivery = "maildir": users alice, bob' in check.stdout
    hosting.start()

    form = b"From: Contact form <www@fgh.test>\nTo: info@fgh.test\nSubject: a question\n\nHi\n"
    hosting.sendmail(MX_TENANT.domain, ["-t", "-i", "-f", "www@fgh.test"], form)

    (message,) = postfix.wait_for(1, timeout=30)
    assert message["X-Original-To"] == "info@fgh.test"
    assert message["Return-Path"] == "<www@fgh.test>"
    assert received_from(message).startswith("from fgh.test (fgh.test [198.51.100.73])")
    assert hosting.stop() == 0


def test_tenant_aliases_and_a_users_forward_file(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    aliases = 'aliases = { info = ["alice", "x1@rcpt.test"] }'
    hosting.write_config((TenantSpec(DUAL.domain, DUAL.ipv4, DUAL.ipv6, aliases),))
    home, uid = hosting.home(DUAL.domain), hosting.uid(DUAL.domain)
    (home / "mail" / "bob").mkdir(parents=True)
    forward = home / "mail" / "bob" / ".forward"
    forward.write_text("# bob keeps a copy\n\\bob, copy@rcpt.test\n")
    for path in (home / "mail", home / "mail" / "bob", forward):
        os.chown(path, uid, uid)
    hosting.start()

    alice = ["-i", "-f", "alice@bcd.test"]
    hosting.sendmail(DUAL.domain, [*alice, "info", "bob"], b"Subject: to both\n\nhello\n")

    wait_for(lambda: hosting.maildir(DUAL.domain, "alice") and hosting.maildir(DUAL.domain, "bob"))
    (for_alice,) = hosting.maildir(DUAL.domain, "alice")
    assert for_alice["Delivered-To"] == "info@bcd.test"
    received = {str(m["X-Original-To"]): m for m in postfix.wait_for(2, timeout=30)}
    assert set(received) == {"x1@rcpt.test", "copy@rcpt.test"}
    # Below the Delivered-To of the receiver's own delivery, the one of the forwarding hop.
    assert received["x1@rcpt.test"].get_all("Delivered-To")[1:] == ["info@bcd.test"]
    assert received["copy@rcpt.test"].get_all("Delivered-To")[1:] == ["bob@bcd.test"]
    for message in received.values():
        assert received_from(message).startswith("from bcd.test (bcd.test [")
        assert message["Return-Path"] == "<alice@bcd.test>"
    assert hosting.stop() == 0


def test_a_loop_is_stopped_with_a_bounce(lab: Lab) -> None:
    """Aliases that lead back to themselves, and a message that comes back to an address
    it was delivered to already (its Delivered-To says so): 5.4.6, to the sender."""
    Nsd(lab, dns_records())
    Postfix(lab)
    hosting = Hosting(lab)
    aliases = 'aliases = { info = "bob", round = "about", about = "round@bcd.test" }'
    hosting.write_config((TenantSpec(DUAL.domain, DUAL.ipv4, DUAL.ipv6, aliases),))
    hosting.start()

    alice = ["-i", "-f", "alice@bcd.test"]
    hosting.sendmail(DUAL.domain, [*alice, "round"], b"Subject: round\n\nand round\n")
    came_back = b"Delivered-To: info@bcd.test\nSubject: back again\n\nhi\n"
    hosting.sendmail(DUAL.domain, [*alice, "info"], came_back)

    wait_for(lambda: len(hosting.maildir(DUAL.domain, "alice")) == 2, timeout=30)
    fields = [
        f for report in hosting.maildir(DUAL.domain, "alice") for f in delivery_status(report)
    ]
    assert sorted((f["Final-Recipient"], f["Status"]) for f in fields) == [
        ("rfc822; info@bcd.test", "5.4.6"),
        ("rfc822; round@bcd.test", "5.4.6"),
    ]
    assert hosting.maildir(DUAL.domain, "bob") == []
    assert hosting.stop() == 0


def test_a_double_bounce_reaches_the_postmaster(lab: Lab) -> None:
    """ghost@bcd.test sends to a recipient that refuses; the bounce finds no ghost: the
    host's postmaster (root, by default) gets the notice, counted in the status."""
    Nsd(lab, dns_records())
    Postfix(lab)  # 550 for reject@rcpt.test
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start()

    hosting.sendmail(
        DUAL.domain, ["-i", "-f", "ghost@bcd.test", "reject@rcpt.test"], b"Subject: x\n\nx\n"
    )

    wait_for(lambda: hosting.mbox("root"), timeout=30)
    (notice,) = hosting.mbox("root")
    assert notice["Subject"] == "Postmaster Warning: Undelivered Bounce"
    assert notice["To"] == "postmaster@abc.test"
    (fields,) = delivery_status(notice)
    assert (fields["Final-Recipient"], fields["Status"]) == ("rfc822; ghost@bcd.test", "5.1.1")
    status = hosting.wait_status(lambda s: s[DUAL.domain]["double_bounces"] == 1)
    assert status[DUAL.domain]["double_bounces"] == 1
    assert "1 double bounces (told the postmaster)" in hosting.nsmail("status").stdout
    assert "double bounce: notice" in hosting.log()
    assert hosting.stop() == 0
