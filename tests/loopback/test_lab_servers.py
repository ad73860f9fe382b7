"""The lab's DNS server and judging SMTP receiver, on loopback only, in threads and as processes."""

from __future__ import annotations

import contextlib
import json
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from nsmail.lab import DnsServer, Receiver
from nsmail.lab.dnsserver import Record

RECORDS: list[Record] = [
    ("localhost.test", "A", "127.0.0.1"),
    ("127.0.0.1", "PTR", "localhost.test"),
    ("localhost6.test", "AAAA", "::1"),
    ("::1", "PTR", "localhost6.test"),
    ("rcpt.test", "MX", "10 mx.rcpt.test"),
    ("rcpt.test", "TXT", "v=spf1 -all"),
    ("deep.below.test", "A", "198.51.100.7"),
    ("big.test", "TXT", "x" * 600),
]
NO_PTR: list[Record] = [("localhost.test", "A", "127.0.0.1")]


def free_port() -> int:
    """A port free for both UDP and TCP on both 127.0.0.1 and ::1."""
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                for family, kind, host in [
                    (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
                    (socket.AF_INET6, socket.SOCK_STREAM, "::1"),
                    (socket.AF_INET6, socket.SOCK_DGRAM, "::1"),
                ]:
                    stack.enter_context(socket.socket(family, kind)).bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for UDP and TCP on 127.0.0.1 and ::1")


@contextlib.contextmanager
def running(server: DnsServer | Receiver) -> Iterator[None]:
    server.start()
    try:
        yield
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dns_port() -> Iterator[int]:
    port = free_port()
    server = DnsServer(RECORDS, [("127.0.0.1", port), ("::1", port)])
    with running(server):
        yield port


def ask(
    port: int, name: str, rdtype: str, host: str = "127.0.0.1", tcp: bool = False, **kw: Any
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    if tcp:
        return dns.query.tcp(query, host, timeout=5, port=port)
    return dns.query.udp(query, host, timeout=5, port=port)


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("localhost.test", "A", ["127.0.0.1"]),
        ("LocalHost.Test.", "A", ["127.0.0.1"]),
        ("localhost6.test", "AAAA", ["::1"]),
        ("rcpt.test", "MX", ["10 mx.rcpt.test."]),
        ("rcpt.test", "TXT", ['"v=spf1 -all"']),
        ("1.0.0.127.in-addr.arpa", "PTR", ["localhost.test."]),
        ("1" + ".0" * 31 + ".ip6.arpa", "PTR", ["localhost6.test."]),
    ],
)
@pytest.mark.parametrize(("host", "tcp"), [("127.0.0.1", False), ("::1", True)])
def test_dns_answers_authoritatively(
    dns_port: int, name: str, rdtype: str, expected: list[str], host: str, tcp: bool
) -> None:
    response = ask(dns_port, name, rdtype, host, tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    [rrset] = response.answer
    assert sorted(rdata.to_text() for rdata in rrset) == expected


def test_dns_nxdomain_inside_its_zones(dns_port: int) -> None:
    response = ask(dns_port, "nobody.test", "A")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    assert [rrset.rdtype for rrset in response.authority] == [dns.rdatatype.SOA]


@pytest.mark.parametrize(("name", "rdtype"), [("localhost.test", "MX"), ("below.test", "A")])
def test_dns_nodata_for_existing_names(dns_port: int, name: str, rdtype: str) -> None:
    response = ask(dns_port, name, rdtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert response.answer == []


def test_dns_refuses_outside_its_zones(dns_port: int) -> None:
    response = ask(dns_port, "example.com", "A")
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA


def test_dns_truncates_over_udp_and_answers_over_tcp(dns_port: int) -> None:
    assert ask(dns_port, "big.test", "TXT", use_edns=False).flags & dns.flags.TC
    [rrset] = ask(dns_port, "big.test", "TXT", tcp=True).answer
    assert b"".join(rrset[0].strings) == b"x" * 600


def test_start_raises_when_an_address_is_taken(dns_port: int) -> None:
    with pytest.raises(OSError):
        DnsServer(RECORDS, [("127.0.0.1", free_port()), ("127.0.0.1", dns_port)]).start()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (("example.com", "A", "198.51.100.1"), "none of the zones"),
        (("a.test", "A", "not-an-address"), "a.test A"),
        (("a.test", "BOGUS", "x"), "a.test BOGUS"),
    ],
)
def test_dns_rejects_bad_records(record: Record, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DnsServer([record], [])


@contextlib.contextmanager
def receiving(
    tmp_path: Path,
    records: Sequence[Record],
    require_fcrdns: bool = False,
    helo_must_match: bool = False,
) -> Iterator[int]:
    """A DNS server serving `records` and a receiver using it; yields the receiver's port."""
    dns_port, smtp_port = free_port(), free_port()
    dns_server = DnsServer(records, [("127.0.0.1", dns_port)])
    listen = [("127.0.0.1", smtp_port), ("::1", smtp_port)]
    receiver = Receiver(
        tmp_path, "127.0.0.1", listen, require_fcrdns, helo_must_match, resolver_port=dns_port
    )
    with running(dns_server), running(receiver):
        yield smtp_port


def send(port: int, helo: str, host: str = "127.0.0.1") -> int:
    """Send one message saying `helo`; the reply code to RCPT."""
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("alice@tenant.test")
        code, _ = smtp.rcpt("bob@rcpt.test")
        if code == 250:
            smtp.data(b"Subject: lab\r\n\r\nhello\r\n")
    return code


def verdicts(maildir: Path) -> list[dict[str, Any]]:
    lines = (maildir / "verdicts.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def delivered(maildir: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((maildir / "new").iterdir())]


@pytest.mark.parametrize(
    ("helo", "host", "received"),
    [
        ("localhost.test", "127.0.0.1", "from localhost.test (localhost.test [127.0.0.1])"),
        ("bcd.test", "127.0.0.1", "from bcd.test (localhost.test [127.0.0.1])"),
        ("localhost6.test", "::1", "from localhost6.test (localhost6.test [IPv6:::1])"),
    ],
)
def test_receiver_records_the_verified_name(
    tmp_path: Path, helo: str, host: str, received: str
) -> None:
    with receiving(tmp_path, RECORDS) as port:
        assert send(port, helo, host) == 250
    [message] = delivered(tmp_path)
    assert message.startswith(f"Received: {received}\n\tby mx.test (".encode())
    assert b"\n\tfor <bob@rcpt.test>;\n\t" in message
    assert message.endswith(b"\nSubject: lab\n\nhello\n")
    [verdict] = verdicts(tmp_path)
    assert verdict == {
        "client": host,
        "helo": helo,
        "verified": received.split("(")[1].split()[0],
        "accepted": True,
        "reason": None,
        "from": "alice@tenant.test",
        "to": ["bob@rcpt.test"],
        "received": received,
    }


def test_receiver_without_ptr_says_unknown(tmp_path: Path) -> None:
    with receiving(tmp_path, NO_PTR) as port:
        assert send(port, "localhost.test") == 250
    [message] = delivered(tmp_path)
    assert message.startswith(b"Received: from localhost.test (unknown [127.0.0.1])\n")


def test_receiver_unconfirmed_ptr_says_unknown(tmp_path: Path) -> None:
    records = [("127.0.0.1", "PTR", "liar.test"), ("liar.test", "A", "198.51.100.9")]
    with receiving(tmp_path, records) as port:
        assert send(port, "liar.test") == 250
    assert verdicts(tmp_path)[0]["verified"] == "unknown"


@pytest.mark.parametrize(
    ("records", "helo", "policy", "reason"),
    [
        (RECORDS, "bcd.test", "helo_must_match", "550 5.7.1 HELO name bcd.test is not"),
        (NO_PTR, "localhost.test", "require_fcrdns", "550 5.7.25 "),
    ],
)
def test_receiver_refuses_by_policy(
    tmp_path: Path, records: list[Record], helo: str, policy: str, reason: str
) -> None:
    with receiving(tmp_path, records, **{policy: True}) as port:
        assert send(port, helo) == 550
    assert delivered(tmp_path) == []
    [verdict] = verdicts(tmp_path)
    assert verdict["accepted"] is False
    assert verdict["reason"].startswith(reason)
    assert verdict["to"] == ["bob@rcpt.test"]


def test_receiver_accepts_a_matching_client_under_both_policies(tmp_path: Path) -> None:
    with receiving(tmp_path, RECORDS, require_fcrdns=True, helo_must_match=True) as port:
        assert send(port, "LocalHost.Test") == 250
    assert verdicts(tmp_path)[0]["received"] == ("from LocalHost.Test (localhost.test [127.0.0.1])")


@contextlib.contextmanager
def process(module: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m module args`, once it printed ready; stopped with SIGTERM, must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_servers_run_as_processes(tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    records.write_text(json.dumps(RECORDS))
    dns_port, smtp_port = free_port(), free_port()
    maildir = tmp_path / "Maildir"
    dns_args = ["--records", str(records), "--listen", f"127.0.0.1:{dns_port}"]
    smtp_args = ["--maildir", str(maildir), "--dns", "127.0.0.1", "--dns-port", str(dns_port)]
    smtp_args += ["--listen", f"[::1]:{smtp_port}", "--helo-must-match"]
    with process("nsmail.lab.dnsserver", *dns_args), process("nsmail.lab.receiver", *smtp_args):
        assert send(smtp_port, "localhost6.test", "::1") == 250
        assert send(smtp_port, "bcd.test", "::1") == 550
    assert [v["accepted"] for v in verdicts(maildir)] == [True, False]
