"""The automatic brake: a tenant whose last hour passes its `suspend_rate` is suspended.

cde.test sends to a recipient the real Postfix defers (451) and to one it refuses (550)
until more than 30% of at least 4 outcomes failed: the supervisor suspends it (a log
line, `nsmail status`, the `nsmail_tenant_suspended` metric), its next message is held
in its queue and reaches nobody, bcd.test goes on delivering, a supervisor restart keeps
the suspension, and `nsmail tenant resume cde.test` sends the held mail.
"""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.request

from hosting import DUAL, V4_ONLY, Hosting, dns_records
from lab import Lab, Nsd, Postfix
from polling import wait_for

METRICS = "127.0.0.1:9425"


def metric(lab: Lab, tenant: str) -> str:
    done = lab.python(
        lab.host,
        f"import urllib.request; print(urllib.request.urlopen('http://{METRICS}/metrics').read().decode())",
    )
    found = re.search(
        rf'^nsmail_tenant_suspended\{{tenant="{re.escape(tenant)}"\}} (\S+)$', done.stdout, re.M
    )
    assert found, done.stdout
    return found.group(1)


def test_a_failing_tenant_is_suspended_its_mail_held_until_resumed() -> None:
    assert urllib.request  # the metrics are fetched from inside the lab's host namespace
    with Lab() as lab:
        Nsd(lab, dns_records())
        postfix = Postfix(lab)
        hosting = Hosting(lab)
        failing = dataclasses.replace(V4_ONLY, extra='suspend_rate = "30% of 4"')
        hosting.write_config(
            (DUAL, failing), host_extra=f'metrics = "{METRICS}"\n', retry_first=60, retry_max=60
        )
        hosting.start()
        domain = failing.domain
        for n, rcpt in enumerate(
            ["x1@rcpt.test", "tempfail@rcpt.test", "reject@rcpt.test", "x1@rcpt.test"]
        ):
            hosting.sendmail(
                domain, ["-i", "-f", "carol@cde.test", rcpt], f"Subject: brake {n}\n\nx\n".encode()
            )
        status = hosting.wait_status(lambda s: s[domain]["state"] == "suspended", timeout=30)
        assert "over suspend_rate 30% of 4" in status[domain]["suspended"]
        assert re.search(rf"{domain}: suspended: \d+ of \d+ outcomes", hosting.log())
        assert metric(lab, domain) == "1.0" and metric(lab, DUAL.domain) == "0.0"
        table = hosting.nsmail("status", domain).stdout
        assert "suspended" in table and f"nsmail tenant resume {domain}" in table

        # Held: submitted and queued, delivered to nobody, while bcd.test delivers.
        hosting.sendmail(
            domain, ["-i", "-f", "carol@cde.test", "x1@rcpt.test"], b"Subject: held\n\nx\n"
        )
        hosting.sendmail(
            DUAL.domain, ["-i", "-f", "alice@bcd.test", "x1@rcpt.test"], b"Subject: free\n\nx\n"
        )
        wait_for(lambda: any(m["Subject"] == "free" for m in postfix.messages()))
        time.sleep(2)
        assert not any(m["Subject"] == "held" for m in postfix.messages())
        queued = hosting.wait_status(lambda s: (s[domain]["queue"] or {}).get("maildrop", 0) >= 1)
        assert queued[domain]["state"] == "suspended"

        # A restarted supervisor keeps it suspended.
        assert hosting.stop() == 0
        hosting.start()
        assert hosting.wait_status(lambda s: s[domain]["state"] == "suspended")

        resumed = hosting.nsmail("tenant", "resume", domain)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed" in resumed.stdout
        wait_for(lambda: any(m["Subject"] == "held" for m in postfix.messages()))
        assert hosting.status()[domain]["state"] != "suspended"
        assert metric(lab, domain) == "0.0"
        again = hosting.nsmail("tenant", "resume", domain)
        assert again.returncode != 0 and "is not suspended" in again.stderr
