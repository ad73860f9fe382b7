"""`scripts/bench smtp --quick` as a smoke test: nsmail's listener and Postfix's smtpd take
every message over SMTP and the sink gets each once, from the right tenant's address with
its EHLO name. Times are never asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def test_quick_smtp_benchmark_delivers_everything_correctly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "smtp", "--quick"],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every message checked: ok" in result.stdout
