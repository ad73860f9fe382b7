"""A receiving SMTP server for the lab that checks the client's identity and records its verdict.

For a client at address a saying HELO h it does what real receivers do: look up the PTR
names of a and keep the first whose A (or AAAA) records contain a, the forward-confirmed
client name v, or ``unknown``. Like Sendmail it writes the verdict into the Received
header, ``from h (v [a])`` (``[IPv6:...]`` for IPv6, RFC 5321 4.1.3), and by policy it
refuses at RCPT a client with no verified name (``require_fcrdns``) or whose HELO name is
not its verified name (``helo_must_match``).

Accepted messages go into a Maildir (written in tmp/, renamed into new/) with the Received
header prepended. Each accepted message and each refused recipient adds one JSON line to
``verdicts.jsonl`` in the Maildir: client, helo, verified, accepted, reason (the refusal
reply, or null), from, to, and received (the ``from`` clause of the Received header).

Run as a process, ``python -m nsmail.lab.receiver --maildir DIR --dns ADDR --listen
ADDR:PORT ...`` prints ``ready`` once every address is bound and serves until SIGTERM or
SIGINT.

Security: test and demo infrastructure, run inside a lab network namespace (as root in the
demo). SMTP commands are untrusted and parsed by aiosmtpd; message bytes are stored, never
parsed; the HELO name is made printable before it goes into a header. DNS answers come
from the lab's DNS server and are trusted as the lab's truth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import ipaddress
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
from aiosmtpd.smtp import SMTP, Envelope, Session

from nsmail.core.text import wire_text

from .serving import Endpoint, LabServer, parse_endpoint

UNKNOWN = "unknown"
IDENT = "nsmail lab receiver"
VERDICTS = "verdicts.jsonl"
DNS_LIFETIME = 5.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the receiver decided for one message or one refused recipient."""

    client: str
    helo: str
    verified: str
    accepted: bool
    reason: str | None
    sender: str
    recipients: tuple[str, ...]
    received: str

    def to_json(self) -> str:
        record = asdict(self)
        record["from"] = record.pop("sender")
        record["to"] = list(record.pop("recipients"))
        return json.dumps(record)


def address_literal(address: str) -> str:
    """The RFC 5321 4.1.3 address literal of an IP address, without its brackets."""
    ip = ipaddress.ip_address(address)
    return f"IPv6:{ip.compressed}" if ip.version == 6 else ip.compressed


def received_from(helo: str, verified: str, address: str) -> str:
    """Sendmail's ``from`` clause: the HELO name, then the verified name and address."""
    return f"from {wire_text(helo)} ({verified} [{address_literal(address)}])"


def received_header(
    from_clause: str, by: str, esmtp: bool, queue_id: str, rcpts: Sequence[str], date: str
) -> str:
    """The Received header (RFC 5321 4.4), folded, ending in a newline."""
    # Sendmail names the recipient only when there is one, so no list of them leaks.
    recipient = f"\n\tfor <{wire_text(rcpts[0])}>" if len(rcpts) == 1 else ""
    protocol = "ESMTP" if esmtp else "SMTP"
    return (
        f"Received: {from_clause}\n\tby {by} ({IDENT}) with {protocol} id {queue_id}"
        f"{recipient};\n\t{date}\n"
    )


def refusal(helo: str, verified: str, require_fcrdns: bool, helo_must_match: bool) -> str | None:
    """The RCPT reply refusing this client, or None to accept it."""
    if require_fcrdns and verified == UNKNOWN:
        # RFC 7372 3.3: X.7.25, reverse DNS validation failed.
        return "550 5.7.25 Client address has no forward-confirmed name"
    if helo_must_match and _normal(helo) != verified:
        return f"550 5.7.1 HELO name {wire_text(helo)} is not the client name {verified}"
    return None


def _normal(name: str) -> str:
    return name.rstrip(".").lower()


async def verified_name(resolver: dns.asyncresolver.Resolver, address: str) -> str:
    """The first PTR name of `address` whose forward records contain it, else ``unknown``."""
    ip = ipaddress.ip_address(address)
    try:
        names = [rdata.target for rdata in await resolver.resolve_address(address)]
    except dns.exception.DNSException:
        return UNKNOWN
    for name in names:
        try:
            forward = await resolver.resolve(name, "AAAA" if ip.version == 6 else "A")
        except dns.exception.DNSException:
            continue
        if any(ipaddress.ip_address(rdata.address) == ip for rdata in forward):
            return _normal(name.to_text())
    return UNKNOWN


@dataclass(frozen=True, slots=True)
class _Site:
    """What every connection shares."""

    maildir: Path
    resolver: dns.asyncresolver.Resolver
    hostname: str
    require_fcrdns: bool
    helo_must_match: bool

    def record(self, verdict: Verdict) -> None:
        with (self.maildir / VERDICTS).open("a") as f:
            f.write(verdict.to_json() + "\n")

    def deliver(self, unique: str, message: bytes) -> None:
        tmp = self.maildir / "tmp" / unique
        tmp.write_bytes(message)
        tmp.rename(self.maildir / "new" / unique)


class _Connection:
    """The aiosmtpd handler of one connection: checks the client once, judges each recipient."""

    def __init__(self, site: _Site) -> None:
        self._site = site
        self._verified: str | None = None

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        site = self._site
        if self._verified is None:
            self._verified = await verified_name(site.resolver, _client(session))
        helo = session.host_name or ""
        reply = refusal(helo, self._verified, site.require_fcrdns, site.helo_must_match)
        if reply is not None:
            site.record(self._verdict(session, envelope, [address], reply))
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        verdict = self._verdict(session, envelope, envelope.rcpt_tos, None)
        queue_id = uuid.uuid4().hex
        header = received_header(
            verdict.received,
            self._site.hostname,
            session.extended_smtp,
            queue_id,
            envelope.rcpt_tos,
            email.utils.formatdate(localtime=True),
        )
        content = envelope.original_content or b""
        # Maildir files use the local newline convention, not SMTP's CRLF.
        message = header.encode() + content.replace(b"\r\n", b"\n")
        self._site.deliver(f"{int(time.time())}.{queue_id}", message)
        self._site.record(verdict)
        return f"250 OK id={queue_id}"

    def _verdict(
        self, session: Session, envelope: Envelope, rcpts: Sequence[str], reason: str | None
    ) -> Verdict:
        client, helo, verified = _client(session), session.host_name or "", self._verified
        assert verified is not None  # aiosmtpd wants an accepted RCPT before DATA
        return Verdict(
            client=client,
            helo=helo,
            verified=verified,
            accepted=reason is None,
            reason=reason,
            sender=envelope.mail_from or "",
            recipients=tuple(rcpts),
            received=received_from(helo, verified, client),
        )


def _client(session: Session) -> str:
    # aiosmtpd types the peer as str; it is the socket's peer name tuple.
    peer: Any = session.peer
    return ipaddress.ip_address(peer[0]).compressed


class Receiver(LabServer):
    """An SMTP server on `listen` delivering into `maildir`, judging clients by lab DNS."""

    def __init__(
        self,
        maildir: Path,
        resolver_address: str,
        listen: Sequence[Endpoint],
        require_fcrdns: bool = False,
        helo_must_match: bool = False,
        *,
        resolver_port: int = 53,
        hostname: str = "mx.test",
    ) -> None:
        super().__init__()
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [resolver_address]
        resolver.port = resolver_port
        resolver.lifetime = DNS_LIFETIME
        self._site = _Site(maildir, resolver, hostname, require_fcrdns, helo_must_match)
        self._listen = tuple(listen)

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self._listen:
            server = await loop.create_server(self._connection, host, port)
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)

    def _connection(self) -> SMTP:
        return SMTP(_Connection(self._site), hostname=self._site.hostname, ident=IDENT)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nsmail.lab.receiver", description="Receive lab mail, judging clients."
    )
    parser.add_argument("--maildir", type=Path, required=True)
    parser.add_argument("--dns", required=True, metavar="ADDR", help="the lab DNS server")
    parser.add_argument("--dns-port", type=int, default=53)
    parser.add_argument(
        "--listen", type=parse_endpoint, action="append", required=True, metavar="ADDR:PORT"
    )
    parser.add_argument("--hostname", default="mx.test", help="this server's name")
    parser.add_argument("--require-fcrdns", action="store_true")
    parser.add_argument("--helo-must-match", action="store_true")
    args = parser.parse_args(argv)
    receiver = Receiver(
        args.maildir,
        args.dns,
        args.listen,
        args.require_fcrdns,
        args.helo_must_match,
        resolver_port=args.dns_port,
        hostname=args.hostname,
    )
    receiver.serve_forever(ready=lambda: print("ready", flush=True))


if __name__ == "__main__":
    main()
