"""Smoke test of the lab itself: real namespaces, NSD and Postfix, no mocks (needs root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import (
    BRIDGE,
    BRIDGE_V4,
    BRIDGE_V6,
    HOST_V4,
    MX_V4,
    MX_V6,
    Lab,
    Nsd,
    Postfix,
    forward_and_reverse,
    sweep_dead_labs,
)

BCD_V4 = "198.51.100.70"
BCD_V6 = "2001:db8:51::70"
RECORDS = [
    *forward_and_reverse("abc.test", HOST_V4),
    (BRIDGE_V4, "PTR", "abc.test"),
    *forward_and_reverse("bcd.test", BCD_V4),
    *forward_and_reverse("bcd.test", BCD_V6),
    ("rcpt.test", "MX", "10 mx.test"),
    ("mx.test", "A", MX_V4),
    ("mx.test", "AAAA", MX_V6),
]

# Runs inside a namespace; prints the final reply as JSON [code, text].
SEND = """
import json, smtplib, sys
host, source, helo, rcpt = sys.argv[1:]
with smtplib.SMTP(host, 25, local_hostname=helo, source_address=(source, 0), timeout=10) as s:
    s.ehlo()
    s.mail("sender@" + helo)
    code, text = s.rcpt(rcpt)
    if code == 250:
        code, text = s.data(b"Subject: lab smoke\\r\\n\\r\\nhello\\r\\n")
print(json.dumps([code, text.decode()]))
"""


def send(lab: Lab, ns: str, source: str, helo: str, rcpt: str = "x@rcpt.test") -> int:
    """Send one message from ``source`` in ``ns``; the reply code to RCPT, or to DATA."""
    mx = MX_V6 if ":" in source else MX_V4
    result = lab.run(ns, [sys.executable, "-c", SEND, mx, source, helo, rcpt])
    code, _ = json.loads(result.stdout)
    assert isinstance(code, int)
    return code


def add_tenant(lab: Lab, name: str) -> str:
    """By hand, what the supervisor will do: a namespace with BCD's addresses on the bridge."""
    ns = f"{lab.prefix}-{name}"
    peer = f"v{name}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    ip("-n", lab.host, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("-n", lab.host, "link", "set", peer, "master", BRIDGE, "up")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "addr", "add", f"{BCD_V4}/32", "dev", "eth0")
    ip("-n", ns, "addr", "add", f"{BCD_V6}/128", "dev", "eth0", "nodad")
    ip("-n", ns, "route", "add", BRIDGE_V4, "dev", "eth0")
    ip("-n", ns, "route", "add", "default", "via", BRIDGE_V4, "dev", "eth0")
    ip("-n", ns, "route", "add", BRIDGE_V6, "dev", "eth0")
    ip("-n", ns, "route", "add", "default", "via", BRIDGE_V6, "dev", "eth0")
    return ns


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Lab, Nsd, str]]:
    with Lab(bridge=True) as lab:
        nsd = Nsd(lab, RECORDS)
        yield lab, nsd, add_tenant(lab, "bcd")
    assert not [name for name in netns_names() if name.startswith(lab.prefix)]


def received(postfix: Postfix, count: int) -> str:
    return str(postfix.wait_for(count, timeout=10)[-1]["Received"])


def test_stock_checks_show_the_verified_client_name(world: tuple[Lab, Nsd, str]) -> None:
    lab, _, tenant = world
    postfix = Postfix(lab)
    try:
        assert send(lab, tenant, BCD_V4, "bcd.test") == 250
        assert "from bcd.test (bcd.test [198.51.100.70])" in received(postfix, 1)
        assert send(lab, tenant, BCD_V6, "bcd.test") == 250
        assert "from bcd.test (bcd.test [IPv6:2001:db8:51::70])" in received(postfix, 2)
        # The stock checks let the machine's own address claim another name.
        assert send(lab, lab.host, HOST_V4, "bcd.test") == 250
        assert "from bcd.test (abc.test [203.0.113.1])" in received(postfix, 3)
        assert send(lab, tenant, BCD_V4, "bcd.test", rcpt="reject@rcpt.test") == 550
        assert send(lab, tenant, BCD_V4, "bcd.test", rcpt="tempfail@rcpt.test") == 451
        assert send(lab, tenant, BCD_V4, "bcd.test", rcpt="x@elsewhere.test") == 554
    finally:
        postfix.stop()


def test_helo_must_match_refuses_a_borrowed_name(world: tuple[Lab, Nsd, str]) -> None:
    lab, _, tenant = world
    postfix = Postfix(lab, helo_must_match=True)
    try:
        assert send(lab, lab.host, HOST_V4, "bcd.test") == 550
        assert "does not match client name abc.test" in postfix.log()
        assert send(lab, tenant, BCD_V6, "bcd.test") == 250
        assert len(postfix.wait_for(1)) == 1
    finally:
        postfix.stop()


def test_dns_restart_replaces_records(world: tuple[Lab, Nsd, str]) -> None:
    lab, nsd, tenant = world
    postfix = Postfix(lab)
    try:
        nsd.restart([record for record in RECORDS if record[2] != BCD_V4])
        # No A record for bcd.test's IPv4 address: the reverse name is not confirmed.
        assert send(lab, tenant, BCD_V4, "bcd.test") == 550
        assert send(lab, tenant, BCD_V6, "bcd.test") == 250
    finally:
        nsd.restart(RECORDS)
        postfix.stop()


def test_resolver_mount_keeps_new_namespaces_visible(world: tuple[Lab, Nsd, str]) -> None:
    lab, _, _ = world
    inner = f"{lab.prefix}-inner"
    script = f"cat /etc/resolv.conf && ip netns add {inner}"
    result = lab.run(lab.host, ["sh", "-c", script], resolver=True)
    assert result.stdout == lab.resolv_conf.read_text()
    assert inner in netns_names()
    subprocess.run(["ip", "netns", "del", inner], check=True)
    assert Path("/etc/resolv.conf").read_text() != lab.resolv_conf.read_text()


def test_teardown_sweeps_everything_even_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(bridge=False) as lab:
        subprocess.run(["ip", "netns", "add", f"{lab.prefix}-stray"], check=True)
        sleeper = lab.popen(lab.host, ["sleep", "60"])
        Path("/etc/netns", f"{lab.prefix}-stray").mkdir(parents=True)
        no_bridge = lab.run(lab.host, ["ip", "link", "show", BRIDGE], check=False)
        assert no_bridge.returncode != 0
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert not [name for name in netns_names() if name.startswith(lab.prefix)]
    assert not list(Path("/etc/netns").glob(f"{lab.prefix}*"))
    assert not lab.tmp.exists()
    lab.close()  # idempotent


def test_a_lab_left_by_a_killed_run_is_swept_by_the_next() -> None:
    """pytest killed with SIGKILL closes no lab: the next lab made removes its namespaces,
    what runs in them and its directory, and leaves the labs of live runs alone."""
    support = str(Path(__file__).resolve().parents[1] / "support")
    code = (
        f"import subprocess, sys, time; sys.path.insert(0, {support!r}); from lab import Lab\n"
        "lab = Lab().__enter__()\n"
        "sleeper = subprocess.Popen(lab.nsenter(lab.net, ['sleep', '60']))\n"
        "print(lab.prefix, lab.tmp, sleeper.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as run:
        assert run.stdout is not None
        prefix, tmp, sleeper = run.stdout.readline().split()
        try:
            assert {f"{prefix}host", f"{prefix}net"} <= set(os.listdir("/run/netns"))
        finally:
            run.kill()
    with Lab() as live:
        assert sweep_dead_labs() == []  # making `live` swept it already
        assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
        assert not Path(tmp).exists()
        assert _ended(int(sleeper))
        assert live.namespaces() == [live.host, live.net]


def _ended(pid: int) -> bool:
    """Whether `pid` is gone or a zombie (its parent was the killed run: init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
