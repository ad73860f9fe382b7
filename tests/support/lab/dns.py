"""An authoritative DNS server (Debian's NSD) for the lab, serving ``test.`` and reverse zones.

NSD listens on ``DNS_V4``/``DNS_V6`` port 53 in the lab's "internet" namespace and serves
the whole ``test.`` zone, so a name nobody planted is NXDOMAIN (an authoritative server
that answers REFUSED outside its zones makes Postfix defer with 450 instead of rejecting).
It also serves ``100.51.198.in-addr.arpa``, ``113.0.203.in-addr.arpa`` and
``8.b.d.0.1.0.0.2.ip6.arpa`` (2001:db8::/32); PTR records are never implied, plant them
(``forward_and_reverse`` makes the usual pair).

Records are ``(name, type, value)`` tuples. Zone files use ``$ORIGIN .``, so every name
and every name inside a value is absolute whether or not it ends in a dot
(``("rcpt.test", "MX", "10 mx.test")``). Values are zone-file text, except TXT values,
which are quoted (and split into 255-byte strings) for you unless they start with ``"``.
A PTR record may name its address instead of its reverse name. Each zone is checked with
``nsd-checkzone`` before NSD starts, so a malformed record fails loudly at ``Nsd(...)`` or
``restart``, not later as a mysterious SERVFAIL. TTLs are 1 s so a restart with new
records shows at once to any caching client.

``signed=True`` signs the ``test.`` zone with DNSSEC (``ldns-signzone`` from Debian's
ldnsutils, one ECDSA P-256 key made by ``ldns-keygen`` for the lab, at every restart), and
``trust_anchor`` is its DS record, for a validating resolver (``Unbound``). The reverse
zones stay unsigned: outside the anchor, a validator calls them insecure.

NSD runs in the foreground (``-d``) as root without chroot; its config, zone files, pid
and log live in a lab temporary directory and it keeps no database (``database: ""``).
Readiness is the "nsd started" log line, written after the sockets are bound and the
zones loaded.

Security: test infrastructure, runs as root; it only serves inside the lab namespace.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nsmail.lab.dnsserver import Record, reverse_name
from nsmail.lab.topology import DNS_V4, DNS_V6

from .topology import Lab, LabError

ZONES = (
    "test",
    "100.51.198.in-addr.arpa",
    "113.0.203.in-addr.arpa",
    "8.b.d.0.1.0.0.2.ip6.arpa",
)
_NS_NAME = "ns.test"
_TTL = 1
_START_TIMEOUT = 10.0


def _owner(name: str, rtype: str) -> str:
    if rtype.upper() == "PTR":
        try:
            return reverse_name(name)
        except ValueError:
            pass
    return name.rstrip(".").lower()


def _zone_of(owner: str) -> str:
    for zone in ZONES:
        if owner == zone or owner.endswith("." + zone):
            return zone
    raise ValueError(f"{owner} is in none of the lab zones {ZONES}")


def _rdata(rtype: str, value: str) -> str:
    if rtype.upper() != "TXT" or value.startswith('"'):
        return value
    raw = value.encode()
    # RFC 1035 3.3.14: a TXT record is a sequence of strings of at most 255 octets each.
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join(_quote(chunk) for chunk in chunks)


def _quote(chunk: bytes) -> str:
    out = []
    for byte in chunk:
        if byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def zone_texts(records: Iterable[Record]) -> dict[str, str]:
    """Zone file text per zone name for ``records`` (pure; exposed for tests)."""
    lines: dict[str, list[str]] = {
        zone: [
            "$ORIGIN .",
            f"$TTL {_TTL}",
            f"{zone} IN SOA {_NS_NAME} hostmaster.test 1 3600 600 86400 {_TTL}",
            f"{zone} IN NS {_NS_NAME}",
        ]
        for zone in ZONES
    }
    lines["test"] += [f"{_NS_NAME} IN A {DNS_V4}", f"{_NS_NAME} IN AAAA {DNS_V6}"]
    for name, rtype, value in records:
        owner = _owner(name, rtype)
        lines[_zone_of(owner)].append(f"{owner} IN {rtype.upper()} {_rdata(rtype, value)}")
    return {zone: "\n".join(text) + "\n" for zone, text in lines.items()}


class Nsd:
    """NSD serving ``records`` in ``lab.net``; started by the constructor, stopped with the lab."""

    def __init__(self, lab: Lab, records: Iterable[Record] = (), *, signed: bool = False) -> None:
        self._lab = lab
        self.dir = lab.tempdir("nsd")
        self._proc: subprocess.Popen[Any] | None = None
        self._key = self._keygen() if signed else None
        lab.defer(self.stop)
        self.restart(records)

    @property
    def trust_anchor(self) -> str:
        """The DS record of the signed ``test.`` zone, as zone-file text."""
        assert self._key is not None, "the zones are not signed"
        return self._key.with_suffix(self._key.suffix + ".ds").read_text().strip()

    def _keygen(self) -> Path:
        made = subprocess.run(
            ["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", "test"],
            cwd=self.dir,
            capture_output=True,
            text=True,
            check=True,
        )
        return self.dir / made.stdout.strip()

    @property
    def _log(self) -> Path:
        return self.dir / "nsd.log"

    def restart(self, records: Iterable[Record]) -> None:
        """Replace every planted record with ``records`` and serve them (NSD restarts)."""
        self.stop()
        self._write(list(records))
        self._log.unlink(missing_ok=True)
        self._proc = self._lab.popen(
            self._lab.net,
            ["nsd", "-d", "-c", str(self.dir / "nsd.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_started()

    def log(self) -> str:
        """NSD's log so far."""
        try:
            return self._log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop NSD if it runs (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _write(self, records: list[Record]) -> None:
        for zone, text in zone_texts(records).items():
            path = self.dir / f"{zone}.zone"
            path.write_text(text)
            if zone == "test" and self._key is not None:
                unsigned, path = path, path.with_name(f"{path.name}.signed")
                subprocess.run(
                    ["ldns-signzone", "-f", str(path), str(unsigned), str(self._key)],
                    capture_output=True,
                    check=True,
                )
            check = subprocess.run(
                ["nsd-checkzone", zone, str(path)], capture_output=True, text=True, check=False
            )
            if check.returncode != 0:
                raise LabError(f"zone {zone}: {check.stdout}{check.stderr}\n{text}")
        (self.dir / "nsd.conf").write_text(self._config())

    def _config(self) -> str:
        d = self.dir
        server = [
            "server:",
            f"  ip-address: {DNS_V4}",
            f"  ip-address: {DNS_V6}",
            "  port: 53",
            '  username: ""',
            '  chroot: ""',
            '  database: ""',
            f"  zonesdir: {d}",
            f"  zonelistfile: {d}/zone.list",
            f"  xfrdfile: {d}/xfrd.state",
            f"  xfrdir: {d}",
            f"  pidfile: {d}/nsd.pid",
            f"  logfile: {self._log}",
            "  server-count: 1",
            "  verbosity: 1",
            # No response rate limiting: at 200 answers/s per source /24 NSD drops the
            # rest, and a fast test or benchmark would measure that limiter instead.
            "  rrl-ratelimit: 0",
            "  rrl-whitelist-ratelimit: 0",
            "remote-control:",
            "  control-enable: no",
        ]
        signed = {"test"} if self._key is not None else set()
        zones = [
            f"zone:\n  name: {zone}\n  zonefile: {zone}.zone{'.signed' if zone in signed else ''}"
            for zone in ZONES
        ]
        return "\n".join(server + zones) + "\n"

    def _wait_started(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while "nsd started" not in self.log():
            if self._proc is None or self._proc.poll() is not None:
                raise LabError(f"nsd exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise LabError(f"nsd did not start in {_START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.01)
