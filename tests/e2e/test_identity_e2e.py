"""End to end: a real Postfix, with Debian's stock identity checks, receives each tenant's
mail under the tenant's own name and address, and sees the hosting machine's instead
when the same mail is sent the usual way."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from hosting import THREE, Hosting, dns_records
from lab import DNS_V4, HOST_V4, MX_V4, Lab, Nsd, Postfix


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def received_line(message: object) -> str:
    """The receiver's own (topmost) Received header, unfolded."""
    return " ".join(str(message["Received"]).split())  # type: ignore[index]


def test_every_tenant_is_received_under_its_own_identity(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config(THREE)
    hosting.start()
    for t in THREE:
        body = f"Subject: from {t.domain}\r\n\r\nhello\r\n".encode()
        hosting.enqueue(t.domain, f"alice@{t.domain}", ["x1@rcpt.test"], body)
    messages = {m["Subject"]: m for m in postfix.wait_for(3, timeout=30)}
    expected = {
        "bcd.test": "from bcd.test (bcd.test [IPv6:2001:db8:51::70])",  # IPv6 preferred
        "cde.test": "from cde.test (cde.test [198.51.100.71])",
        "def.test": "from def.test (def.test [IPv6:2001:db8:51::72])",
    }
    for domain, clean in expected.items():
        assert received_line(messages[f"from {domain}"]).startswith(clean)
        incoming = hosting.home(domain) / "var/spool/nsmail/incoming"
        assert list(incoming.iterdir()) == []
    assert hosting.stop() == 0


SEND_FROM_HOST = """
import smtplib, sys
with smtplib.SMTP(sys.argv[1], 25, local_hostname="bcd.test", source_address=(sys.argv[2], 0),
                  timeout=10) as smtp:
    try:
        smtp.sendmail("alice@bcd.test", ["x1@rcpt.test"], b"Subject: naive\\r\\n\\r\\nhello\\r\\n")
        print("accepted")
    except smtplib.SMTPException as e:
        print("refused", e)
"""


def send_from_host(lab: Lab) -> str:
    out = lab.run(lab.host, [sys.executable, "-c", SEND_FROM_HOST, MX_V4, HOST_V4])
    return str(out.stdout).strip()


def test_the_usual_way_shows_the_hosting_machine_instead(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    assert send_from_host(lab) == "accepted"
    (message,) = postfix.wait_for(1)
    assert received_line(message).startswith(f"from bcd.test (abc.test [{HOST_V4}])")
    postfix.stop()

    strict = Postfix(lab, helo_must_match=True)
    verdict = send_from_host(lab)
    assert verdict.startswith("refused") and "550" in verdict
    assert strict.messages() == []


FORWARDER = """
import socket, sys
# A loopback DNS stub in the hosting machine's namespace, like systemd-resolved's 127.0.0.53.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
while True:
    query, client = s.recvfrom(65535)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
        up.settimeout(5)
        up.sendto(query, (sys.argv[1], 53))
        try:
            s.sendto(up.recv(65535), client)
        except OSError:
            pass
"""


def test_dns_works_through_a_loopback_stub_on_the_host(lab: Lab) -> None:
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    lab.popen(lab.host, [sys.executable, "-c", FORWARDER, DNS_V4])
    hosting = Hosting(lab, resolvers=("127.0.0.1",))
    hosting.write_config(THREE[1:2])
    hosting.start()
    hosting.enqueue("cde.test", "alice@cde.test", ["x1@rcpt.test"], b"Subject: stub\r\n\r\nhi\r\n")
    (message,) = postfix.wait_for(1, timeout=30)
    assert received_line(message).startswith("from cde.test (cde.test [198.51.100.71])")
    assert hosting.stop() == 0
