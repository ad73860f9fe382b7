"""The real supervisor keeps the firewall table of its host namespace, or starts no tenant.

`nsmail supervise` runs in the lab's host namespace (tests/hosting.py), so the table is
made there; `test_jail_probes` shows what it keeps tenants' workers from reaching.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from firewall_sets import sets
from hosting import DUAL, THREE, V4_ONLY, V6_ONLY, Hosting, TenantSpec
from lab import Lab

ADDED = TenantSpec("efg.test", "198.51.100.73", "2001:db8:51::73")
LATER = TenantSpec("fgh.test", "198.51.100.74", None)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def reload(hosting: Hosting, tenants: tuple[TenantSpec, ...]) -> None:
    hosting.write_config(tenants)
    hosting.signal(signal.SIGHUP)
    domains = {t.domain for t in tenants}
    hosting.wait_status(lambda s: set(s) == domains and all(w["pid"] for w in s.values()))


@pytest.mark.parametrize("mode", ["bridge", "routed"])
def test_the_table_follows_the_tenants_through_reloads_and_stop(lab: Lab, mode: str) -> None:
    hosting = Hosting(lab, mode=mode)
    hosting.write_config(THREE)
    hosting.start()
    assert sets(lab) == {
        "tenants4": {"198.51.100.70", "198.51.100.71"},
        "tenants6": {"2001:db8:51::70", "2001:db8:51::72"},
    }
    # V4_ONLY removed, ADDED added: ADDED's worker starts at once, V4_ONLY's ends after
    # the message in hand, and its address leaves the set with the next change.
    reload(hosting, (DUAL, V6_ONLY, ADDED))
    assert sets(lab) == {
        "tenants4": {"198.51.100.70", "198.51.100.71", "198.51.100.73"},
        "tenants6": {"2001:db8:51::70", "2001:db8:51::72", "2001:db8:51::73"},
    }
    reload(hosting, (DUAL, V6_ONLY, ADDED, LATER))
    assert sets(lab) == {
        "tenants4": {"198.51.100.70", "198.51.100.73", "198.51.100.74"},
        "tenants6": {"2001:db8:51::70", "2001:db8:51::72", "2001:db8:51::73"},
    }
    assert hosting.stop() == 0
    assert sets(lab) is None


def test_a_failing_nft_starts_no_tenant_and_says_why(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "nft"
    fake.write_text(
        "#!/bin/sh\necho 'Error: Could not process rule: Operation not supported' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V4_ONLY))
    hosting.start()  # ready: the host's own worker runs, tenants wait for their next start
    why = (
        "cannot prepare its namespace or queue:"
        " nft: Error: Could not process rule: Operation not supported"
    )
    status = hosting.wait_status(lambda s: all(w["last_error"] == why for w in s.values()))
    assert {w["state"] for w in status.values()} == {"crashed"}
    assert {w["pid"] for w in status.values()} == {None}
    assert not [n for n in os.listdir("/run/netns") if n.startswith(lab.prefix + "-")]
    assert hosting.host_status()["pid"] is not None
    assert f"{DUAL.domain}: {why}; next start in 1 s" in hosting.log()
    assert hosting.stop() == 0
