"""A validating resolver (Debian's Unbound) for the lab, as an operator runs one on the
hosting machine: on 127.0.0.1 of the lab's host namespace, asking the lab's NSD for
``test.`` and the reverse zones, and validating ``test.`` with NSD's trust anchor (its
zones signed: ``Nsd(signed=True)``).

The supervisor under test is given ``resolvers = ["127.0.0.1"]``: its DNS relay then runs
next to the resolver, over the loopback, the one path from which it believes the AD bit.
Unbound runs in the foreground as root without chroot; its config, log and pid live in a
lab temporary directory. Readiness is its "start of service" log line.

Security: test infrastructure, runs as root; it only serves inside the lab namespace.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from nsmail.lab.topology import DNS_V4

from .dns import ZONES, Nsd
from .topology import Lab, LabError

ADDRESS = "127.0.0.1"
_START_TIMEOUT = 10.0


class Unbound:
    """Unbound in ``lab.host``, validating what ``nsd`` serves; stopped with the lab."""

    def __init__(self, lab: Lab, nsd: Nsd) -> None:
        self.dir = lab.tempdir("unbound")
        self._log = self.dir / "unbound.log"
        config = self.dir / "unbound.conf"
        config.write_text(self._config(nsd.trust_anchor))
        subprocess.run(["unbound-checkconf", str(config)], capture_output=True, check=True)
        self._proc: subprocess.Popen[Any] = lab.popen(
            lab.host,
            ["unbound", "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        lab.defer(self.stop)
        self._wait_started()

    def log(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def _config(self, anchor: str) -> str:
        d: Path = self.dir
        server = [
            "server:",
            f"  interface: {ADDRESS}",
            "  port: 53",
            "  access-control: 127.0.0.0/8 allow",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{d}"',
            f'  pidfile: "{d}/unbound.pid"',
            f'  logfile: "{self._log}"',
            "  use-syslog: no",
            "  verbosity: 1",
            "  val-log-level: 2",
            "  do-ip6: no",
            "  qname-minimisation: no",
            "  harden-dnssec-stripped: yes",
            '  module-config: "validator iterator"',
            f'  trust-anchor: "{anchor}"',
            # The lab's zones change between tests: nothing kept past their TTL of 1 s.
            "  cache-max-ttl: 1",
            "  cache-max-negative-ttl: 1",
            "remote-control:",
            "  control-enable: no",
        ]
        stubs = [f'stub-zone:\n  name: "{zone}."\n  stub-addr: {DNS_V4}' for zone in ZONES]
        # Outside the trust anchor (the reverse zones): insecure, never bogus. And none of
        # them answered by Unbound itself (RFC 6761 and 6303 names are, by default).
        insecure = [f'  domain-insecure: "{zone}."' for zone in ZONES if zone != "test"]
        insecure += [f'  local-zone: "{zone}." nodefault' for zone in ZONES]
        return "\n".join(server[:-2] + insecure + server[-2:] + stubs) + "\n"

    def _wait_started(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while "start of service" not in self.log():
            if self._proc.poll() is not None:
                raise LabError(f"unbound exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise LabError(f"unbound did not start in {_START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.01)
