"""What /proc says of a process."""

from __future__ import annotations

import os


def cpu_seconds(pid: int) -> float:
    """The CPU time, user and system, that `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
