"""The real supervisor in a lab host namespace: bring-up, restarts, reload, shutdown."""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hosting import DUAL, NSMAIL, THREE, V4_ONLY, V6_ONLY, Hosting, TenantSpec, dns_records
from lab import Lab, Nsd, Postfix

from nsmail.root.netns import SOURCE_RULE_PRIORITY
from nsmail.root.supervisor import PING_TIMEOUT
from nsmail.submit.submission import cached

# A live worker: started but not yet reporting, or as it reports itself.
UP = {"running", "idle", "delivering", "backing off"}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def global_addresses(lab: Lab, namespace: str) -> dict[str, set[str]]:
    out = lab.run(lab.host, ["ip", "-j", "-n", namespace, "addr"], capture_output=True, text=True)
    by_link: dict[str, set[str]] = {}
    for link in json.loads(out.stdout):
        by_link[link["ifname"]] = {
            a["local"]
            for a in link.get("addr_info", [])
            if not ipaddress.ip_address(a["local"]).is_link_local
        }
    return by_link


def host_links(lab: Lab) -> set[str]:
    out = lab.run(lab.host, ["ip", "-j", "link"], capture_output=True, text=True)
    return {link["ifname"] for link in json.loads(out.stdout)}


def source_rules(lab: Lab) -> list[str]:
    """The host's rules that refuse locally made packets with a tenant's source address."""
    rules = []
    for family in ("-4", "-6"):
        out = lab.run(lab.host, ["ip", "-j", family, "rule"], capture_output=True, text=True)
        for rule in json.loads(out.stdout):
            if rule["priority"] == SOURCE_RULE_PRIORITY:
                assert (rule["iif"], rule["action"]) == ("lo", "prohibit"), rule
                rules.append(rule["src"])
    return sorted(rules)


def lab_namespaces(lab: Lab) -> set[str]:
    return {n for n in os.listdir("/run/netns") if n.startswith(lab.prefix)}


def tenant_namespaces(lab: Lab) -> set[str]:
    return {n for n in os.listdir("/run/netns") if n.startswith(lab.prefix + "-")}


@pytest.mark.parametrize("mode", ["bridge", "routed"])
def test_each_namespace_holds_exactly_its_tenants_addresses(lab: Lab, mode: str) -> None:
    hosting = Hosting(lab, mode=mode)
    hosting.write_config(THREE)
    hosting.start()
    status = hosting.status()
    for t in THREE:
        ns = hosting.namespace(t.domain)
        expected = {a for a in (t.ipv4, t.ipv6) if a}
        assert global_addresses(lab, ns) == {"lo": {"127.0.0.1", "::1"}, "eth0": expected}
        record = status[t.domain]
        assert record["namespace"] == ns
        assert record["uid"] == hosting.uid(t.domain)
        assert record["state"] in UP
        assert (record["ipv4"], record["ipv6"]) == (t.ipv4, t.ipv6)
        # The worker really is in that namespace, as that uid.
        pid = record["pid"]
        assert os.readlink(f"/proc/{pid}/ns/net") == _ns_id(f"/run/netns/{ns}")
        assert hosting.proc_uid(pid) == hosting.uid(t.domain)
    assert hosting.stop() == 0


def _ns_id(path: str) -> str:
    return f"net:[{os.stat(path).st_ino}]"


def test_killed_worker_is_restarted_with_growing_backoff(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V4_ONLY))
    hosting.start()
    first = hosting.status()["bcd.test"]["pid"]
    other = hosting.status()["cde.test"]["pid"]

    killed_at = time.monotonic()
    os.kill(first, signal.SIGKILL)
    status = hosting.wait_status(lambda s: s["bcd.test"]["pid"] not in (None, first), timeout=5.0)
    assert time.monotonic() - killed_at < 5.0
    second = status["bcd.test"]["pid"]
    assert status["bcd.test"]["restarts"] == 1
    assert "SIGKILL" in status["bcd.test"]["last_error"]

    # Dying again right away: the next restart waits longer (2 s instead of 1 s).
    killed_at = time.monotonic()
    os.kill(second, signal.SIGKILL)
    hosting.wait_status(lambda s: s["bcd.test"]["state"] == "crashed", timeout=2.0)
    status = hosting.wait_status(lambda s: s["bcd.test"]["pid"] not in (None, second), timeout=10.0)
    assert time.monotonic() - killed_at >= 1.5
    assert status["bcd.test"]["restarts"] == 2
    assert status["cde.test"]["pid"] == other, "another tenant was disturbed"
    assert hosting.stop() == 0


def test_reload_adds_removes_and_leaves_the_unchanged_alone(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V4_ONLY))
    hosting.start()
    before = hosting.status()
    changed = TenantSpec(V4_ONLY.domain, "198.51.100.81", None)
    hosting.write_config((DUAL, V6_ONLY, changed))
    hosting.signal(signal.SIGHUP)
    hosting.wait_notify("READY=1")
    after = hosting.wait_status(
        lambda s: (
            set(s) == {"bcd.test", "def.test", "cde.test"}
            and all(w["state"] in UP for w in s.values())
            and s["cde.test"]["ipv4"] == "198.51.100.81"
        )
    )
    assert after["bcd.test"]["pid"] == before["bcd.test"]["pid"]
    assert after["cde.test"]["pid"] != before["cde.test"]["pid"]
    assert global_addresses(lab, hosting.namespace("cde.test"))["eth0"] == {"198.51.100.81"}
    rules = ["198.51.100.70", "198.51.100.81", "2001:db8:51::70", "2001:db8:51::72"]
    assert source_rules(lab) == rules
    # What nsmail-sendmail reads instead of the configuration follows the reload.
    profiles = cached(str(hosting.config_path))
    assert profiles is not None and profiles.current
    assert profiles.of_uid(hosting.uid("def.test")).domain == "def.test"

    hosting.write_config((DUAL,))
    hosting.signal(signal.SIGHUP)
    after = hosting.wait_status(lambda s: set(s) == {"bcd.test"})
    assert after["bcd.test"]["pid"] == before["bcd.test"]["pid"]
    _wait(lambda: tenant_namespaces(lab) == {hosting.namespace("bcd.test")})
    assert source_rules(lab) == ["198.51.100.70", "2001:db8:51::70"]
    assert hosting.stop() == 0


def overall(hosting: Hosting) -> dict[str, Any]:
    """`nsmail status --json` whole: the workers, the DNS relay, a refused reload."""
    result = hosting.nsmail("status", "--json")
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def test_a_bad_reload_keeps_everything_running_and_status_says_so(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start()
    before = hosting.status()
    assert overall(hosting)["reload_refused"] is None
    good = hosting.config_path.read_text()
    hosting.config_path.write_text(good + "bogus = 1\n")
    asked = time.time()
    hosting.signal(signal.SIGHUP)
    hosting.wait_notify("READY=1")
    assert hosting.status() == before
    assert "reload refused" in hosting.log()
    refused = overall(hosting)["reload_refused"]
    assert refused["error"] == f"{hosting.config_path}: tenant[0].bogus: unknown key"
    assert asked <= refused["at"] <= time.time()
    table = hosting.nsmail("status").stdout.splitlines()
    assert table[1].startswith("! reload refused ")
    assert " ".join(line.strip() for line in table[2:4]) == refused["error"]
    # The next reload that succeeds clears it.
    hosting.config_path.write_text(good)
    hosting.signal(signal.SIGHUP)
    hosting.wait_notify("READY=1")
    assert overall(hosting)["reload_refused"] is None
    assert "reload refused" not in hosting.nsmail("status").stdout
    assert hosting.stop() == 0


def test_a_stopped_dns_relay_is_replaced_and_dns_works_again(lab: Lab) -> None:
    """The relay runs as `[host] dns_user`, a uid of its own. Stopped with SIGSTOP, it
    answers no ping: the supervisor kills it and starts another, which gets every
    worker's channel, and mail that needs DNS leaves again. Status shows the relay."""
    Nsd(lab, dns_records())
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start()
    relay = overall(hosting)["relay"]
    assert relay["state"] == "running" and relay["restarts"] == 0
    stopped = relay["pid"]
    assert hosting.proc_uid(stopped) == pwd.getpwnam("nsmail-dns").pw_uid
    assert "(dns relay)" in hosting.nsmail("status").stdout
    os.kill(stopped, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while (relay := overall(hosting)["relay"])["pid"] in (None, stopped):
        assert time.monotonic() < deadline, hosting.log()
        time.sleep(0.2)
    assert relay["state"] == "running" and relay["restarts"] == 1
    assert relay["last_error"] == f"did not answer a ping within {PING_TIMEOUT:.0f} s"
    assert f"dns relay {stopped} did not answer a ping" in hosting.log()
    assert _zombie_or_gone(stopped)
    hosting.enqueue(DUAL.domain, "alice@bcd.test", ["x@rcpt.test"], b"Subject: dns\r\n\r\n")
    (message,) = postfix.wait_for(1)
    assert message["Subject"] == "dns"
    assert hosting.stop() == 0


def test_sigterm_leaves_no_namespace_link_or_process(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config(THREE)
    hosting.start()
    pids = [w["pid"] for w in hosting.status().values()]
    links_before = host_links(lab)
    assert len([n for n in links_before if n.startswith(lab.prefix)]) == 3
    assert hosting.stop() == 0
    assert tenant_namespaces(lab) == set()
    assert not [n for n in host_links(lab) if n.startswith(lab.prefix)]
    assert source_rules(lab) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
    assert not (hosting.run_dir / "control").exists()
    status = hosting.nsmail("status")
    assert status.returncode == 69 and "no supervisor" in status.stderr


def open_files(pid: int) -> tuple[int, int]:
    """The soft and hard limit on open files of a process."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_supervisor_raises_its_open_files_limit_and_its_workers_do_not(lab: Lab) -> None:
    """Two descriptors per tenant would meet systemd's soft limit of 1024 near 500
    tenants: the supervisor (and its DNS relay) raise it to the hard limit; a worker
    keeps the soft one the supervisor started with, as its hard limit too."""
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # as systemd starts it
    try:
        hosting.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert hosting.proc is not None
    assert open_files(hosting.proc.pid) == (hard, hard)
    assert open_files(overall(hosting)["relay"]["pid"]) == (hard, hard)
    assert open_files(hosting.status()[DUAL.domain]["pid"]) == (1024, 1024)
    assert open_files(hosting.host_status()["pid"]) == (1024, 1024)
    assert hosting.stop() == 0


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_supervisor_killed_hard_is_cleaned_up_by_the_next(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V6_ONLY))
    hosting.start()
    old = hosting.status()
    assert hosting.proc is not None
    hosting.proc.kill()
    hosting.proc.wait()
    # Workers die with their supervisor (parent-death signal): no orphan keeps delivering.
    _wait(lambda: all(_zombie_or_gone(w["pid"]) for w in old.values()))
    hosting.start()
    new = hosting.status()
    assert all(w["state"] in UP for w in new.values())
    assert tenant_namespaces(lab) == {hosting.namespace(d) for d in new}
    # The dead supervisor's rules were removed and made again, not doubled.
    assert source_rules(lab) == ["198.51.100.70", "2001:db8:51::70", "2001:db8:51::72"]
    assert hosting.stop() == 0


def _wait(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


TENANT = '[[tenant]]\ndomain = "x.test"\nuid = 4243\ngid = 4243\nhome = "/tmp"\n'
BAD_CONFIGS = [
    ("not toml", lambda base: "[host\n", "toml"),
    (
        "unknown key",
        lambda base: base.replace("[host]\n", '[host]\ncolour = "blue"\n'),
        "host.colour",
    ),
    ("bad address", lambda base: base + TENANT + 'ipv4 = "198.51.100.999"\n', "ipv4"),
    ("v6 as v4", lambda base: base + TENANT + 'ipv4 = "2001:db8::9"\n', "ipv4"),
    ("no address", lambda base: base + TENANT, "tenant[1]"),
    ("taken address", lambda base: base + TENANT + 'ipv4 = "198.51.100.70"\n', "ipv4"),
    (
        "duplicate domain",
        lambda base: base + TENANT.replace("x.test", "bcd.test") + 'ipv4 = "198.51.100.90"\n',
        "domain",
    ),
    (
        "bad domain",
        lambda base: base + TENANT.replace("x.test", "-x.test") + 'ipv4 = "198.51.100.90"\n',
        "domain",
    ),
    (
        "unknown user",
        lambda base: (
            base + '[[tenant]]\ndomain = "x.test"\nuser = "nope-x"\nipv4 = "198.51.100.90"\n'
        ),
        "user",
    ),
    (
        "root tenant",
        lambda base: base + TENANT.replace("4243", "0") + 'ipv4 = "198.51.100.90"\n',
        "uid",
    ),
    (
        "missing home",
        lambda base: base + TENANT.replace("/tmp", "/nonexistent/x") + 'ipv4 = "198.51.100.90"\n',
        "home",
    ),
    ("bad mode", lambda base: base.replace('mode = "bridge"', 'mode = "tunnel"'), "network.mode"),
]


@pytest.mark.parametrize(("name", "spoil", "field"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_is_one_line_exit_78_and_creates_nothing(
    lab: Lab, name: str, spoil: Callable[[str], str], field: str
) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.config_path.write_text(spoil(hosting.config_path.read_text()))
    before = lab_namespaces(lab)
    for command in ("check", "supervise"):
        result = lab.run(
            lab.host,
            [NSMAIL, "--config", str(hosting.config_path), command],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 78, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"nsmail: {hosting.config_path}: ")
        assert field in lines[0]
    assert lab_namespaces(lab) == before
    assert not hosting.run_dir.exists()


def test_status_without_supervisor_exits_69(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    result = hosting.nsmail("status", "--json")
    assert result.returncode == 69
    assert result.stderr.count("\n") == 1


def test_the_control_socket_serves_root_and_the_admin_group_only(lab: Lab) -> None:
    admins = grp.getgrnam("nogroup").gr_gid
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), host_extra='admin_group = "nogroup"\n')
    hosting.start()
    stranger = hosting.uid_base + 998

    def status_as(gid: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NSMAIL, "--config", str(hosting.config_path), "status", "--json"],
            user=stranger,
            group=gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
        )

    admin = status_as(admins)
    assert admin.returncode == 0, admin.stderr
    assert [w["domain"] for w in json.loads(admin.stdout)["workers"]] == ["abc.test", "bcd.test"]
    refused = status_as(stranger)
    assert refused.returncode == 77 and "permission denied" in refused.stderr
    assert hosting.stop() == 0


def test_status_watch_refreshes_until_interrupted(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL,))
    hosting.start()
    watching = subprocess.Popen(
        [NSMAIL, "--config", str(hosting.config_path), "status", "--watch", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    watching.send_signal(signal.SIGINT)
    out, _ = watching.communicate(timeout=10)
    assert watching.returncode == 0
    snapshots = [json.loads(line) for line in out.splitlines()]
    assert len(snapshots) >= 2 and all(s["host"] == "abc.test" for s in snapshots)
    assert hosting.stop() == 0


IDLE_SCRAPERS = """
import json, os, signal, socket, sys, time
from pathlib import Path
from nsmail.root import control
port, run_dir, worker = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def still_open(s):  # waiting, with neither a reply nor the end of the connection
    try:
        s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False

def control_connection():
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(run_dir / "control"))
    return s

idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]  # silent
idle += [control_connection() for _ in range(8)]
time.sleep(0.2)  # let the supervisor take them in
answered = control.request(run_dir, "status")["ok"]
open_after_status = all(map(still_open, idle))
os.kill(worker, signal.SIGKILL)
while control.request(run_dir, "status")["workers"][1]["pid"] == worker:
    time.sleep(0.01)
print(json.dumps([answered, open_after_status, all(map(still_open, idle))]))
"""


def test_idle_metrics_connections_hold_up_neither_status_nor_reaping(lab: Lab) -> None:
    """16 connections to the metrics endpoint that never send their request (any local
    user can open them), and 8 such to the control socket: `nsmail status` is answered,
    and a killed worker reaped, while they are all still open."""
    hosting = Hosting(lab)
    hosting.write_config((DUAL,), host_extra='metrics = "127.0.0.1:9425"\n')
    hosting.start()
    worker = hosting.status()[DUAL.domain]["pid"]
    argv = [sys.executable, "-c", IDLE_SCRAPERS, "9425", str(hosting.run_dir), str(worker)]
    result = lab.run(lab.host, argv)
    assert json.loads(result.stdout) == [True, True, True], hosting.log()
    hosting.wait_status(lambda s: s[DUAL.domain]["pid"] not in (None, worker))
    assert hosting.stop() == 0


PEER_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 2525))
s.listen()
while True:
    c, peer = s.accept()
    c.sendall(peer[0].removeprefix("::ffff:").encode())
    c.close()
"""
CLIENT = """
import socket
with socket.create_connection(("203.0.113.25", 2525), timeout=5) as s:
    print("seen as", s.recv(100).decode())
print(open("/proc/self/status").read())
"""


def test_exec_runs_any_program_with_the_tenants_identity(lab: Lab) -> None:
    lab.popen(lab.net, [sys.executable, "-c", PEER_ECHO])
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V4_ONLY))
    hosting.start()
    time.sleep(0.3)
    result = hosting.nsmail("exec", "cde.test", "--", sys.executable, "-c", CLIENT)
    assert result.returncode == 0, result.stderr
    assert "seen as 198.51.100.71" in result.stdout
    status = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    uid = str(hosting.uid("cde.test"))
    assert status["Uid"].split() == [uid] * 4
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    unknown = hosting.nsmail("exec", "nope.test", "--", "true")
    assert unknown.returncode == 64
    assert hosting.stop() == 0
