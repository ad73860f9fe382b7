"""`nsmail demo`, run as a command: its report, its refusals, and that it leaves nothing behind
when it ends, fails, is interrupted or is taken down after `--keep`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from hosting import DUAL, V4_ONLY, Hosting
from lab import Lab

from nsmail.lab import demo, scenario, topology
from nsmail.lab.receiver import address_literal

NSMAIL = str(Path(sys.executable).with_name("nsmail"))


@cache
def demo_command() -> list[str]:
    """`nsmail demo` once the CLI has it, else the module's own entry point."""
    wired = subprocess.run([NSMAIL, "demo", "--help"], capture_output=True, check=False)
    if wired.returncode == 0:
        return [NSMAIL, "demo"]
    code = "import sys; from nsmail.lab.demo import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code]


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*demo_command(), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
        check=False,
    )


def leftovers() -> list[str]:
    """Whatever a demo made that still exists: namespaces, state, temp dirs, processes."""
    found = topology.owned(scenario.NAMES)
    found += [str(p) for p in demo.TEMP_PARENT.glob(demo.TEMP_PREFIX + "*")]
    found += [str(demo.STATE_FILE)] if demo.STATE_FILE.exists() else []
    tenant_uids = range(demo.FIRST_UID, demo.FIRST_UID + len(scenario.TENANTS))
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            uid = int((entry / "status").read_text().split("\nUid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if not cmdline:
            continue  # exiting (or a zombie its parent has not reaped yet)
        if demo.TEMP_PREFIX.encode() in cmdline or uid in tenant_uids:
            found.append(f"process {entry.name} uid {uid}: {cmdline!r}")
    return found


def kept_config() -> Path:
    """The configuration of the kept demo, from its inventory."""
    return scenario.config_path(Path(json.loads(demo.STATE_FILE.read_text())["tmp"]))


@pytest.fixture
def clean() -> Iterator[None]:
    """Nothing of a demo before the test, and nothing after it (even if the test failed)."""
    assert not leftovers(), "a demo is up; take it down with `nsmail demo --down`"
    yield
    left = leftovers()
    if left:
        run_demo("--down")
    assert not left


# --- as root: the real thing --------------------------------------------------------------


def test_json_report_then_nothing_left(clean: None) -> None:
    result = run_demo("--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not report["strict"]
    for tenant, spec in zip(report["tenants"], scenario.TENANTS, strict=True):
        domain = spec.domain
        assert tenant["naive"] == {
            "received": f"from {domain} (abc.test [203.0.113.1])",
            "verified": "abc.test",
        }
        assert tenant["nsmail"]["clean"], tenant
        literals = [address_literal(a) for a in spec.addresses]
        assert tenant["nsmail"]["received"] in [f"from {domain} ({domain} [{a}])" for a in literals]
    workers = {w["domain"]: w for w in report["status"]}
    for spec in scenario.TENANTS:
        assert workers[spec.domain]["pid"] is not None
        assert workers[spec.domain]["uid"] >= demo.FIRST_UID


def test_strict_receiver_refuses_the_usual_way(clean: None) -> None:
    result = run_demo("--json", "--strict")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["strict"]
    for tenant in report["tenants"]:
        assert tenant["naive"]["refused"].startswith("550 5.7.1 HELO name"), tenant
        assert tenant["nsmail"]["clean"], tenant


@pytest.mark.parametrize("after", ["creating namespaces", "starting the nsmail supervisor"])
def test_interrupted_demo_leaves_nothing(clean: None, after: str) -> None:
    proc = subprocess.Popen(
        demo_command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    progress = ""
    while after not in progress:
        line = proc.stderr.readline()
        assert line, f"the demo ended before {after!r}: {progress}"
        progress += line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, progress + stderr
    assert "interrupted by SIGINT" in stderr


def test_a_killed_demo_is_removed_by_the_next(clean: None) -> None:
    """kill -9 leaves the lab up: the next demo removes what the inventory records, first."""
    proc = subprocess.Popen(
        demo_command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    progress = ""
    while "sending" not in progress:  # the supervisor is up, with its tenants
        line = proc.stderr.readline()
        assert line, f"the demo ended before sending: {progress}"
        progress += line
    proc.kill()
    proc.communicate(timeout=10)
    assert Path("/run/netns/demo-bcd.test").exists()

    result = run_demo("--json")
    assert result.returncode == 0, result.stderr
    assert "removing what an interrupted demo left" in result.stderr
    assert all(t["nsmail"]["clean"] for t in json.loads(result.stdout)["tenants"])


def test_a_lab_namespace_nothing_recorded_is_refused_then_removed(clean: None) -> None:
    stray = topology.NETNS_DIR / scenario.NAMES.host
    subprocess.run(["ip", "netns", "add", stray.name], check=True)
    result = run_demo()
    assert result.returncode == 1
    assert "nsmail demo: demohost exists; it is removed now, run the demo again" in result.stderr
    assert not stray.exists()


@pytest.mark.parametrize("stage", ["servers", "supervisor"])
def test_failing_demo_says_why_and_leaves_nothing(clean: None, stage: str) -> None:
    result = run_demo(env={demo.FAIL_AT_ENV: stage})
    assert result.returncode == 1
    assert f"nsmail demo: failing after {stage}" in result.stderr


def test_kept_lab_refuses_a_second_demo_until_taken_down(clean: None) -> None:
    kept = run_demo("--keep")
    try:
        assert kept.returncode == 0, kept.stderr
        assert "from bcd.test (abc.test [203.0.113.1])" in kept.stdout
        assert "from bcd.test (bcd.test [IPv6:2001:db8:51::70])" in kept.stdout
        assert "nsmail demo --down" in kept.stdout
        assert Path("/run/netns/demo-bcd.test").exists()
        status = subprocess.run(
            [NSMAIL, "status", "--json"],
            env={**os.environ, "NSMAIL_CONFIG": str(kept_config())},
            capture_output=True,
            text=True,
            check=False,
        )
        assert status.returncode == 0, status.stderr

        second = run_demo()
        assert second.returncode == 1
        assert "nsmail demo --down" in second.stderr
        assert Path("/run/netns/demo-bcd.test").exists()
    finally:
        down = run_demo("--down")
    assert down.returncode == 0, down.stderr
    assert not leftovers()
    again = run_demo("--down")
    assert again.returncode == 0 and "no demo is up" in again.stderr


def test_twice_in_a_row_beside_a_running_supervisor(clean: None) -> None:
    # Another nsmail, with its own tenants, runs on this machine meanwhile: untouched.
    with Lab() as lab:
        hosting = Hosting(lab)
        hosting.write_config((DUAL, V4_ONLY))
        hosting.start()
        before = hosting.status()
        for _ in range(2):
            result = run_demo("--json")
            assert result.returncode == 0, result.stderr
            assert all(t["nsmail"]["clean"] for t in json.loads(result.stdout)["tenants"])
        after = hosting.status()
        assert {d: w["pid"] for d, w in after.items()} == {d: w["pid"] for d, w in before.items()}
        assert all(os.path.exists(f"/run/netns/{hosting.namespace(d)}") for d in after)
        assert hosting.stop() == 0
