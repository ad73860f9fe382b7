"""A tenant's user with a shell: commands and Python code run as that user, on the host.

The attacker is not the jailed worker (`test_jail_probes` covers that): it is a login
shell of the tenant's uid and gid in the hosting machine's normal environment (here the
lab's host namespace), with no supplementary groups and, like any user, no effective
capabilities. `setpriv` makes the drop after `nsenter` has entered the namespace, so
nothing of root's reaches the attacker's code.

Python run with `Attacker.python` has `outcome(action)` at hand, which names the errno a
refused action raised (or "ok"), and must print its result as JSON.

Security: test infrastructure, runs as root; what it starts runs as the tenant's uid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import Lab

PRELUDE = """
import errno, json, os, socket, sys

def outcome(action):
    try:
        action()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    return "ok"

"""


@dataclass(frozen=True)
class Attacker:
    """Tenant `domain`'s user, logged in on the hosting machine."""

    lab: Lab
    domain: str
    uid: int
    gid: int
    home: Path
    config: Path

    def argv(self, argv: list[str]) -> list[str]:
        drop = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ]
        return self.lab.nsenter(self.lab.host, [*drop, *argv])

    def run(
        self, argv: list[str], stdin: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` as the attacker; stdout and stderr as text."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "NSMAIL_CONFIG": str(self.config),
        }
        if "PYTHONPATH" in os.environ:  # the nsmail under test, wherever it is
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        result = subprocess.run(
            self.argv(argv),
            input=stdin,
            env=env,
            cwd="/",
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )

    def nsmail(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([str(Path(sys.executable).with_name("nsmail")), *args])

    def python(self, code: str, *args: object) -> Any:
        """Run `code` (with PRELUDE) as the attacker; the JSON it printed."""
        result = self.run([sys.executable, "-c", PRELUDE + code, *map(str, args)])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
