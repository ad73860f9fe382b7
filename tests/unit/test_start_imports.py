"""What each of nsmail's root processes imports at start: each only what it runs.

The zygote forks before the supervisor's imports and loads the worker's modules itself
(`nsmail.root.children`), so the supervisor must not import them, and what the zygote
and the command line import must not bring netlink's library (pyroute2: a tenth of a
second on these machines). A subprocess each: this test's own imports must not count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_supervisor_does_not_import_what_its_workers_run() -> None:
    assert not {m for m in loaded("nsmail.root.supervisor") if m.startswith("nsmail.tenant")}


@pytest.mark.parametrize(
    "module", ["nsmail.commands.cli", "nsmail.root.spawn", "nsmail.root.children"]
)
def test_what_starts_before_the_supervisor_does_not_import_netlink(module: str) -> None:
    assert "pyroute2" not in loaded(module)
