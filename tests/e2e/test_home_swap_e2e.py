"""A tenant swaps its home for a symlink to another tenant's home after the supervisor
read the configuration: its next worker must refuse to start (shown crashed, retried
with back-off), never be jailed there."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosting import DUAL, V4_ONLY, Hosting
from lab import Lab

from nsmail.root.jail import run_as

ATTACKER, VICTIM = V4_ONLY.domain, DUAL.domain


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def test_a_home_swapped_after_start_is_never_entered(lab: Lab) -> None:
    hosting = Hosting(lab)
    hosting.write_config((DUAL, V4_ONLY))
    hosting.start()
    before = hosting.wait_status(lambda s: all(w["pid"] for w in s.values()))
    home, victims_home = hosting.home(ATTACKER), hosting.home(VICTIM)
    # The race made deterministic: after the configuration was read (which would refuse
    # it now), the directory holding the homes became shared, sticky like /tmp.
    home.parent.chmod(0o1777)

    def swap() -> None:
        home.rename(home.with_name(f"{ATTACKER}.moved"))
        home.symlink_to(victims_home)

    assert run_as(hosting.uid(ATTACKER), hosting.uid(ATTACKER), swap) == 0
    os.kill(before[ATTACKER]["pid"], signal.SIGKILL)  # restarted after 1 s, into the swap

    after = hosting.wait_status(
        lambda s: (s[ATTACKER]["last_error"] or "").endswith("exited with status 70")
    )
    assert after[ATTACKER]["state"] == "crashed" and after[ATTACKER]["pid"] is None
    assert f"cannot enter {home}: {home}: a symbolic link or not a directory" in hosting.log()
    assert after[VICTIM]["pid"] == before[VICTIM]["pid"]
    assert hosting.uid(ATTACKER) not in _uids(hosting)
    assert hosting.stop() == 0


def _uids(hosting: Hosting) -> set[int]:
    """The real uids of the processes there are (one may end while it is looked at)."""
    uids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                uids.add(hosting.proc_uid(int(entry.name)))
    return uids
