"""Adverse receivers for the lab's "internet" namespace: a slow one and a tarpit.

Each has a `Site` of its own, a domain whose MX is a name of its own at addresses of its
own, added to the internet namespace beside the MX and the DNS server (so the instant
receivers on ``MX_V4``/``MX_V6`` stay where they are); `Site.records` is its DNS.

``SlowSmtp`` takes everything at once but the final dot, which it answers only after
``delay`` seconds, as a receiver that scans each message before it says 250. Each
transaction is written to a file of its own in ``dumps`` (written whole, then renamed in),
headed as Postfix's ``smtp-sink -d`` heads its dumps (``X-Client-Addr``, ``X-Helo-Args``,
``X-Mail-Args``, ``X-Rcpt-Args``), so a benchmark checks its mail as it checks the instant
sink's, plus ``X-Sessions``: the connections it held open at that dot, so a test sees from
the receiver's side whether a client sends in parallel. SMTP is aiosmtpd's.

``Tarpit`` accepts connections and never says a word: a client waits out its greeting
timeout (RFC 5321 4.5.3.2.1: five minutes) for every session it opens there.

Both write a line per connection accepted (its time and the client's address):
``connections()``.

``DEAD`` is a site with nothing listening on its addresses: every connection is refused.

Each receiver is a process in the lab's internet namespace (``python -m lab.receivers
slow|tarpit ...``, run from tests/support; it prints "ready" once every address is bound)
and stops with the lab, or earlier with ``stop``: its connections then close as a server's
that goes away. ``serve_tarpit`` is the tarpit's connection handler, for a server that
runs one in its own loop (``rude_smtp``).

Security: test infrastructure; runs as root inside a lab namespace only and binds only
the addresses it is given. SMTP commands are untrusted and parsed by aiosmtpd; message
bytes are stored, never parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from nsmail.lab.dnsserver import Record
from nsmail.lab.serving import Endpoint, LabServer, parse_endpoint

from .topology import Lab, LabError

SUPPORT = Path(__file__).resolve().parent.parent  # tests/support: `-m lab.receivers` runs there
PEER = "eth0"  # the internet namespace's link (nsmail.lab.topology.PEER)
_READY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Site:
    """A receiving domain: its MX host's name and addresses in the internet namespace."""

    domain: str
    host: str
    ipv4: str
    ipv6: str

    def records(self) -> list[Record]:
        """Its MX, and the MX host's A and AAAA records."""
        return [
            (self.domain, "MX", f"10 {self.host}"),
            (self.host, "A", self.ipv4),
            (self.host, "AAAA", self.ipv6),
        ]

    def listen(self, port: int = 25) -> list[str]:
        return [f"{self.ipv4}:{port}", f"[{self.ipv6}]:{port}"]

    def add_to(self, lab: Lab) -> None:
        """Put its addresses on the internet namespace's link (once)."""
        present = lab.run(lab.net, ["ip", "-o", "addr", "show", "dev", PEER]).stdout.split()
        for address, length in ((self.ipv4, 24), (self.ipv6, 64)):
            if f"{address}/{length}" not in present:
                # No duplicate address detection: nobody else is on this link.
                lab.run(lab.net, ["ip", "addr", "add", f"{address}/{length}", "dev", PEER, "nodad"])


SLOW = Site("slow.test", "mx.slow.test", "203.0.113.26", "2001:db8:113::26")
TARPIT = Site("tarpit.test", "mx.tarpit.test", "203.0.113.27", "2001:db8:113::27")
DEAD = Site("dead.test", "mx.dead.test", "203.0.113.28", "2001:db8:113::28")


# -- the servers (in the receiver's own process) ----------------------------------------


def _accepted(log: Path, peer: Any) -> None:
    with log.open("a") as f:
        f.write(f"{time.time():.6f} {peer[0]}\n")


class _Slow:
    """The aiosmtpd handler: the final dot answered after `delay` seconds."""

    def __init__(self, dumps: Path, delay: float, log: Path) -> None:
        self.dumps = dumps
        self.delay = delay
        self.log = log
        self.open = 0  # connections
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        peer: Any = session.peer  # typed as str; it is the socket's peer name tuple
        head = (
            f"X-Client-Addr: {peer[0]}\nX-Helo-Args: {session.host_name}\n"
            f"X-Mail-Args: FROM:<{envelope.mail_from}>\n"
            + "".join(f"X-Rcpt-Args: TO:<{rcpt}>\n" for rcpt in envelope.rcpt_tos)
            + f"X-Sessions: {self.open}\n"
        )
        content = (envelope.original_content or b"").replace(b"\r\n", b"\n")
        self.count += 1
        name = f"{os.getpid()}.{self.count}"
        part = self.dumps / f".{name}"
        part.write_bytes(head.encode() + content)
        part.rename(self.dumps / name)
        return "250 2.0.0 Ok: stored"


class _Counted(SMTP):
    """aiosmtpd's server, counting the connections open."""

    def __init__(self, handler: _Slow, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._slow = handler

    def connection_made(self, transport: Any) -> None:
        self._slow.open += 1
        _accepted(self._slow.log, transport.get_extra_info("peername"))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._slow.open -= 1
        super().connection_lost(error)


class _SlowServer(LabServer):
    def __init__(self, listen: Sequence[Endpoint], dumps: Path, delay: float, log: Path) -> None:
        super().__init__()
        self._listen = tuple(listen)
        self._handler = _Slow(dumps, delay, log)

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self._listen:
            server = await loop.create_server(self._connection, host, port)
            stack.callback(server.close)

    def _connection(self) -> SMTP:
        return _Counted(self._handler, hostname=SLOW.host, ident="slow lab receiver")


async def serve_tarpit(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: Path | None = None
) -> None:
    """Hold a connection without a word until the client gives up (or the server stops)."""
    if log is not None:
        _accepted(log, writer.get_extra_info("peername"))
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass  # whatever the client says, no answer
    writer.close()


class _TarpitServer(LabServer):
    def __init__(self, listen: Sequence[Endpoint], log: Path) -> None:
        super().__init__()
        self._listen = tuple(listen)
        self._log = log

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        for host, port in self._listen:
            server = await asyncio.start_server(self._connection, host, port)
            stack.callback(server.close)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_tarpit(reader, writer, self._log)


# -- starting them in a lab ---------------------------------------------------------------


class _Receiver:
    """A receiver process in the lab's internet namespace, on `site`'s addresses."""

    def __init__(self, lab: Lab, site: Site, directory: Path, command: list[str]) -> None:
        site.add_to(lab)
        self.site = site
        self.log = directory / "connections"
        listen = [arg for address in site.listen() for arg in ("--listen", address)]
        argv = [sys.executable, "-m", "lab.receivers", *command, *listen, f"--log={self.log}"]
        self._stderr = directory / "stderr"
        with self._stderr.open("w") as stderr:
            self._proc = lab.popen(
                lab.net, argv, cwd=SUPPORT, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], _READY_TIMEOUT)
        line = self._proc.stdout.readline() if ready else ""
        self._proc.stdout.close()
        if line.strip() != "ready":
            error = self._stderr.read_text(errors="replace")
            raise LabError(f"{command[0]} receiver did not start: {line!r}\n{error}")

    def connections(self) -> list[float]:
        """When each connection so far was accepted (wall clock)."""
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [float(line.split()[0]) for line in lines]

    def stop(self) -> None:
        """End it now; the connections it holds close (idempotent)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


class SlowSmtp(_Receiver):
    """A receiver answering the final dot after `delay` seconds; see the module docstring."""

    def __init__(self, lab: Lab, site: Site = SLOW, delay: float = 1.0) -> None:
        directory = lab.tempdir("slow")
        self.dumps = directory / "dumps"
        self.dumps.mkdir()
        super().__init__(
            lab, site, directory, ["slow", f"--dumps={self.dumps}", f"--delay={delay}"]
        )

    def count(self) -> int:
        return sum(1 for name in os.listdir(self.dumps) if not name.startswith("."))

    def dumped(self) -> list[Path]:
        return sorted(p for p in self.dumps.iterdir() if not p.name.startswith("."))

    def sessions(self) -> list[int]:
        """For each message taken so far, the connections open at its final dot."""
        found = []
        for path in self.dumped():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("X-Sessions: "):
                    found.append(int(line.removeprefix("X-Sessions: ")))
                    break
        return found


class Tarpit(_Receiver):
    """A receiver that accepts and never greets; see the module docstring."""

    def __init__(self, lab: Lab, site: Site = TARPIT) -> None:
        super().__init__(lab, site, lab.tempdir("tarpit"), ["tarpit"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.receivers", description=__doc__)
    parser.add_argument("kind", choices=("slow", "tarpit"))
    parser.add_argument(
        "--listen", type=parse_endpoint, action="append", required=True, metavar="ADDR:PORT"
    )
    parser.add_argument("--dumps", type=Path, help="slow: where each transaction goes")
    parser.add_argument("--delay", type=float, default=1.0, help="slow: seconds before 250")
    parser.add_argument("--log", type=Path, required=True, help="a line per connection")
    args = parser.parse_args(argv)
    server: LabServer
    if args.kind == "slow":
        server = _SlowServer(args.listen, args.dumps, args.delay, args.log)
    else:
        server = _TarpitServer(args.listen, args.log)
    server.serve_forever(ready=lambda: print("ready", flush=True))


if __name__ == "__main__":
    main()
