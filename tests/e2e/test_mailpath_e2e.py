"""The mail path end to end: `nsmail-sendmail` run by a tenant user, the real supervisor
and jailed workers, a real Postfix receiver and a real NSD, all in lab namespaces."""

from __future__ import annotations

import dataclasses
import os
import pwd
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hosting import DUAL, V6_ONLY, Hosting, dns_records
from lab import HOST_V4, HOST_V6, MX_V4, MX_V6, Lab, Nsd, Postfix, forward_and_reverse
from mailboxes import delivery_status
from polling import wait_for


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def spool_empty(hosting: Hosting, domain: str) -> bool:
    spool = hosting.home(domain) / "var/spool/nsmail"
    return not any(
        (spool / state).is_dir() and os.listdir(spool / state)
        for state in ("maildrop", "incoming", "active", "deferred")
    )


MESSAGE = (
    b"From: Alice <alice@bcd.test>\n"
    b"To: x1@rcpt.test, x2@other.test, bob@bcd.test, reject@rcpt.test\n"
    b"Subject: one message, four fates\n"
    b"\n"
    b"Hello from a web app.\n"
)


def test_one_message_local_remote_and_refused(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start()

    hosting.sendmail(DUAL.domain, ["-t", "-i", "-f", "alice@bcd.test"], MESSAGE)

    received = postfix.wait_for(2, timeout=30)
    assert sorted(str(m["X-Original-To"] or m["Delivered-To"]) for m in received) == [
        "x1@rcpt.test",
        "x2@other.test",
    ]
    for message in received:
        # Completed headers with the tenant's identity, and the tenant's own address.
        assert message["Message-ID"].endswith("@bcd.test>")
        assert message["Date"]
        assert message["From"] == "Alice <alice@bcd.test>"
        received_line = " ".join(str(message["Received"]).split())
        assert received_line.startswith("from bcd.test (bcd.test [IPv6:2001:db8:51::70])")
        assert message["Bcc"] is None
    # bob is a local user of bcd.test: his Maildir, not the network.
    wait_for(lambda: hosting.maildir(DUAL.domain, "bob"))
    (local,) = hosting.maildir(DUAL.domain, "bob")
    assert local["Subject"] == "one message, four fates"
    assert local["Return-Path"] == "<alice@bcd.test>"
    # reject@ got a 550: the non-delivery report is in the sender's own Maildir.
    wait_for(lambda: hosting.maildir(DUAL.domain, "alice"))
    (report,) = hosting.maildir(DUAL.domain, "alice")
    assert report.get_content_type() == "multipart/report"
    (fields,) = delivery_status(report)
    assert fields["Final-Recipient"] == "rfc822; reject@rcpt.test"
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.1.1"
    wait_for(lambda: spool_empty(hosting, DUAL.domain))
    assert hosting.stop() == 0


def test_null_implicit_and_ipv6_only_mx(lab: Lab) -> None:
    records = [r for r in dns_records() if r[0] not in ("rcpt.test", "other.test")]
    records += [
        ("rcpt.test", "MX", "10 mx6.test"),  # its only MX has only an IPv6 address
        ("mx6.test", "AAAA", MX_V6),
        *forward_and_reverse("other.test", MX_V4),  # no MX: the implicit MX, RFC 5321 5.1
        ("nullmx.test", "MX", "0 ."),  # RFC 7505: accepts no mail
    ]
    Nsd(lab, records)
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V6_ONLY))
    hosting.start()

    hosting.sendmail(
        V6_ONLY.domain,
        ["-i", "-f", "alice@def.test", "y@rcpt.test"],
        b"Subject: v6\n\nhi\n",
    )
    hosting.sendmail(
        DUAL.domain, ["-i", "-f", "alice@bcd.test", "z@other.test"], b"Subject: a\n\nhi\n"
    )
    hosting.sendmail(
        DUAL.domain, ["-i", "-f", "alice@bcd.test", "n@nullmx.test"], b"Subject: n\n\nhi\n"
    )

    received = {m["Subject"]: m for m in postfix.wait_for(2, timeout=30)}
    v6 = " ".join(str(received["v6"]["Received"]).split())
    assert v6.startswith("from def.test (def.test [IPv6:2001:db8:51::72])")
    implicit = " ".join(str(received["a"]["Received"]).split())
    assert implicit.startswith("from bcd.test (bcd.test [198.51.100.70])")
    # The null MX bounced at once, without any connection.
    wait_for(lambda: hosting.maildir(DUAL.domain, "alice"))
    (report,) = hosting.maildir(DUAL.domain, "alice")
    (fields,) = delivery_status(report)
    assert fields["Final-Recipient"] == "rfc822; n@nullmx.test"
    assert fields["Status"] == "5.1.10"
    assert "nullmx" not in postfix.log()
    assert hosting.stop() == 0


def test_the_machines_own_users_send_as_the_host(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start()
    host = hosting.host_status()
    assert host["uid"] == pwd.getpwnam("nsmail").pw_uid and host["namespace"] is None
    stranger = hosting.uid_base + 999  # no tenant's uid
    hosting.sendmail(None, ["-i", "x1@rcpt.test"], b"Subject: cron\n\nthe job ran\n", stranger)
    (message,) = postfix.wait_for(1, timeout=30)
    received = " ".join(str(message["Received"]).split())
    assert received.startswith(f"from abc.test (abc.test [IPv6:{HOST_V6}])")
    assert message["From"] == f"uid{stranger}@abc.test"
    assert hosting.stop() == 0


def test_status_shows_each_workers_queue_and_counters(lab: Lab) -> None:
    Nsd(lab, dns_records())
    Postfix(lab)  # answers 451 for tempfail@rcpt.test
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V6_ONLY))
    hosting.start()
    hosting.sendmail(DUAL.domain, ["-i", "tempfail@rcpt.test"], b"Subject: later\n\nhi\n")
    hosting.sendmail(V6_ONLY.domain, ["-i", "x@rcpt.test"], b"Subject: now\n\nhi\n")

    def settled(status: dict[str, dict[str, Any]]) -> bool:
        # The states too: the report after an attempt says "delivering", and the next
        # one, "idle", may wait out the rate limit of reports (half a second).
        deferred, clean = status[DUAL.domain], status[V6_ONLY.domain]
        return (deferred["state"], clean["state"]) == ("backing off", "idle") and (
            (deferred["queue"] or {}).get("deferred") == 1
            and (clean["total"] or {}).get("sent") == 1
        )

    status = hosting.wait_status(settled, timeout=30)
    deferred, clean = status[DUAL.domain], status[V6_ONLY.domain]
    assert deferred["hour"]["deferred"] == 1 and "451" in deferred["last_error"]
    assert sum(clean["queue"].values()) == 0
    assert clean["last_delivery_at"] is not None
    table = hosting.nsmail("status")
    assert table.returncode == 0
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
    assert "backing off" in table.stdout and "(host's own)" in table.stdout
    assert hosting.stop() == 0


SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode())
"""


def test_metrics_count_what_was_delivered(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V6_ONLY), host_extra=f'metrics = "{HOST_V4}:9425"\n')
    hosting.start()
    alice = ["-i", "-f", "alice@bcd.test"]
    for n in range(2):
        hosting.sendmail(DUAL.domain, [*alice, f"x{n}@rcpt.test"], b"Subject: m\n\nhi\n")
    hosting.sendmail(DUAL.domain, [*alice, "reject@rcpt.test"], b"Subject: m\n\nhi\n")
    postfix.wait_for(2)

    def sent() -> dict[str, float]:
        page = lab.run(lab.net, [sys.executable, "-c", SCRAPE, f"{HOST_V4}:9425"]).stdout
        samples = {}
        for line in page.splitlines():
            if line.startswith("nsmail_messages_total{"):
                labels, value = line.rsplit(" ", 1)
                samples[labels] = float(value)
        return samples

    # Two to Postfix, and the report on reject@ into alice's own Maildir.
    wait_for(lambda: sent().get('nsmail_messages_total{outcome="sent",tenant="bcd.test"}') == 3)
    samples = sent()
    assert samples['nsmail_messages_total{outcome="bounced",tenant="bcd.test"}'] == 1
    assert samples['nsmail_messages_total{outcome="sent",tenant="def.test"}'] == 0
    page = lab.run(lab.net, [sys.executable, "-c", SCRAPE, f"{HOST_V4}:9425"]).stdout
    assert 'nsmail_delivery_latency_seconds_count{tenant="bcd.test"} 3.0' in page
    assert 'nsmail_queue_messages{state="deferred",tenant="bcd.test"} 0.0' in page
    assert hosting.stop() == 0


def test_tenant_add_and_remove_on_a_running_supervisor(lab: Lab) -> None:
    Nsd(lab, [*dns_records(), *forward_and_reverse("new.test", "198.51.100.90")])
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V6_ONLY))
    hosting.start()
    before = hosting.status()
    uid = hosting.uid("new.test")
    home = hosting.home("new.test")
    home.mkdir(parents=True)
    os.chown(home, uid, uid)
    add = ["tenant", "add", "new.test", "--ipv4", "198.51.100.90", "--uid", str(uid)]
    add += ["--gid", str(uid), "--home", str(home)]

    # Bad input: a taken address, a bad domain. A clear line, nothing written.
    dropins = hosting.etc / "tenants.d"
    taken = hosting.nsmail(*add[:3], "--ipv4", "198.51.100.70", *add[5:])
    assert taken.returncode == 78 and "198.51.100.70" in taken.stderr and "already" in taken.stderr
    bad = hosting.nsmail("tenant", "add", "bad_domain.test", *add[3:])
    assert bad.returncode == 78 and bad.stderr.count("\n") == 1
    assert list(dropins.iterdir()) == []

    added = hosting.nsmail(*add)
    assert added.returncode == 0, added.stderr
    status = hosting.wait_status(lambda s: "new.test" in s and s["new.test"]["pid"])
    assert {d: status[d]["pid"] for d in before} == {d: w["pid"] for d, w in before.items()}
    hosting.sendmail("new.test", ["-i", "-f", "a@new.test", "x@rcpt.test"], b"Subject: new\n\nhi\n")
    (message,) = postfix.wait_for(1)
    assert " ".join(str(message["Received"]).split()).startswith(
        "from new.test (new.test [198.51.100.90])"
    )

    removed = hosting.nsmail("tenant", "remove", "new.test")
    assert removed.returncode == 0, removed.stderr
    after = hosting.wait_status(lambda s: "new.test" not in s)
    assert {d: w["pid"] for d, w in after.items()} == {d: w["pid"] for d, w in before.items()}
    wait_for(lambda: not os.path.exists(f"/run/netns/{hosting.namespace('new.test')}"))
    assert list(dropins.iterdir()) == []
    assert hosting.stop() == 0


def test_mail_over_the_hourly_limit_is_held_not_lost(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    limited = dataclasses.replace(DUAL, extra="hourly_limit = 3")
    hosting.write_config((limited, V6_ONLY))
    hosting.start()
    for n in range(5):
        hosting.sendmail(DUAL.domain, ["-i", "-f", "alice@bcd.test", f"l{n}@rcpt.test"], b"\n")
    for n in range(5):
        hosting.sendmail(V6_ONLY.domain, ["-i", "-f", "alice@def.test", f"f{n}@rcpt.test"], b"\n")
    postfix.wait_for(8)  # 3 of the limited tenant, all 5 of the other
    status = hosting.wait_status(lambda s: (s[DUAL.domain]["queue"] or {}).get("hold") == 2)
    assert "per hour" in status[DUAL.domain]["last_error"]
    assert status[V6_ONLY.domain]["queue"]["hold"] == 0
    # An operator looks, and lets them go.
    released = hosting.nsmail("queue", "release", "--all", "--tenant", DUAL.domain)
    assert released.returncode == 0, released.stderr
    assert len(postfix.wait_for(10)) == 10
    assert hosting.stop() == 0


def test_a_killed_worker_does_not_start_the_hour_afresh(lab: Lab) -> None:
    """The tenant's user may kill its own worker: the next one still counts what the
    killed one had taken in toward the hourly limit (from its last report)."""
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((dataclasses.replace(DUAL, extra="hourly_limit = 3"),))
    hosting.start()
    for n in range(3):
        hosting.sendmail(DUAL.domain, ["-i", "-f", "alice@bcd.test", f"k{n}@rcpt.test"], b"\n")
    postfix.wait_for(3)
    status = hosting.wait_status(lambda s: s[DUAL.domain]["total"]["sent"] == 3)
    killed = status[DUAL.domain]["pid"]
    os.kill(killed, signal.SIGKILL)
    hosting.wait_status(lambda s: s[DUAL.domain]["pid"] not in (None, killed))
    for n in range(2):
        hosting.sendmail(DUAL.domain, ["-i", "-f", "alice@bcd.test", f"a{n}@rcpt.test"], b"\n")
    status = hosting.wait_status(lambda s: (s[DUAL.domain]["queue"] or {}).get("hold") == 2)
    assert "per hour" in status[DUAL.domain]["last_error"]
    assert len(postfix.messages()) == 3
    assert hosting.stop() == 0
