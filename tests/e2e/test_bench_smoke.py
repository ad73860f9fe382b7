"""`scripts/bench --quick` as a smoke test: both systems deliver everything, each message
from the right address with the right EHLO name. Times are never asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def test_quick_benchmark_delivers_everything_correctly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every message checked: all arrived once" in result.stdout
