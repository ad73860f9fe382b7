"""The automatic brake's memory: which tenants are suspended, and why, across restarts.

The supervisor suspends a tenant when its worker's report passes `suspend_rate`
(`nsmail.core.suspend`) and resumes it only when the operator says so
(`nsmail tenant resume DOMAIN`), so the state must outlive a supervisor restart, which
would otherwise start the worker afresh with nothing counted. It is one JSON file in the
run directory, written atomically; the run directory is a tmpfs on most systems, so a
reboot forgets it (and the rule suspends a tenant again that goes on failing).

Security: runs as root in the supervisor; the file is in root's run directory (mode
0644) and holds only what the supervisor wrote. One that does not parse is taken as no
suspension, with a log line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("nsmail.root.brake")

FILE_NAME = "suspended.json"


def load(run_dir: Path) -> dict[str, str]:
    """The suspended tenants (domain: why) the last supervisor left."""
    path = run_dir / FILE_NAME
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.error("%s: cannot read it, no tenant is taken as suspended: %s", path, e)
        return {}
    if not isinstance(found, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in found.items()
    ):
        log.error("%s: not a map of domains to reasons, no tenant is taken as suspended", path)
        return {}
    return found


def save(run_dir: Path, suspended: Mapping[str, str]) -> None:
    path = run_dir / FILE_NAME
    partial = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    partial.write_text(json.dumps(dict(suspended), indent=1, sort_keys=True))
    os.replace(partial, path)
