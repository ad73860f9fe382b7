"""What a test needs of the machine: root, or a program on PATH.

A test whose needs are not met is skipped with the reason, but fails under CI=true (an
error at setup): a CI run must not pass by skipping what it was meant to prove. Tests
state needs with the `needs` mark (see `tiers`); a fixture that needs something calls
`require`.
"""

from __future__ import annotations

import os
import shutil

import pytest


def unmet(need: str) -> str | None:
    """Why the machine does not give `need` ("root" or a program's name), or None."""
    if need == "root":
        return None if os.geteuid() == 0 else "needs root"
    return None if shutil.which(need) else f"needs {need}, which is not installed"


def require(*needs: str) -> None:
    """Skip the running test unless every one of `needs` is met; under CI=true, fail it."""
    reasons = [reason for reason in map(unmet, needs) if reason]
    if not reasons:
        return
    reason = "; ".join(reasons)
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and under CI=true a test may not be skipped", pytrace=False)
    pytest.skip(reason)
