"""The SMTP delivery of one message: route each recipient domain, connect, report per recipient.

Connections leave from the tenant's own address (explicit bind) and greet with the
tenant's name, so the receiver sees the tenant, never the host. Each recipient ends with
one outcome: delivered, temporary failure or permanent failure, with the reply behind it.

Security: runs as the tenant inside its namespace and chroot. Envelope addresses come
from tenant-written queue files and replies from remote servers; neither is trusted:
addresses are checked before they reach an SMTP command, and text from either is
escaped before it reaches a log line.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from nsmail.core.config import DeliveryConfig, Tenant
from nsmail.core.message import CHUNK, Message, dot_stuffed
from nsmail.core.queuefile import Envelope
from nsmail.core.routing import NullMX, Targets, route
from nsmail.tenant import neterror

log = logging.getLogger("nsmail.tenant.delivery")

# RFC 5321 4.1.2: no control characters, spaces or angle brackets inside a path.
_BAD_PATH_CHARS = re.compile(r"[\x00-\x20\x7f<>]")
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with RST, keep no state
# RFC 5321 4.2: a reply line is the code, then "-" if more lines follow, else SP or nothing.
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:[ -][^\r\n]*)?\r?\n")
_MAX_REPLY_LINE = 8192  # smtplib's limit; RFC 5321 4.5.3.1.5 says 512 octets
_MAX_REPLY_LINES = 100  # far more than the longest EHLO reply


class Status(StrEnum):
    DELIVERED = "sent"
    TEMPORARY = "deferred"
    PERMANENT = "bounced"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recipient in one delivery attempt."""

    recipient: str
    status: Status
    code: int | None  # the server's SMTP reply code; None: no reply (nsmail decided)
    text: str  # the reply's text, or nsmail's words; starts with an RFC 3463 status code
    relay: str  # host[ip]:port, or "" when no connection was made


class Connections:
    """SMTP sessions kept open between messages (RFC 5321 3.3: a session may carry
    several transactions), per mail host and address, for a short idle time."""

    IDLE = 2.0  # seconds, like Postfix's smtp_connection_cache_time_limit
    MAX_USES = 100

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], tuple[_BoundSMTP, float, int]] = {}

    def take(self, key: tuple[str, str]) -> tuple[_BoundSMTP, int] | None:
        found = self._open.pop(key, None)
        return None if found is None else (found[0], found[2])

    def keep(self, key: tuple[str, str], client: _BoundSMTP, uses: int) -> None:
        if uses >= self.MAX_USES:
            _quietly_quit(client)
            client.close()
            return
        self._open[key] = (client, time.monotonic(), uses)

    def close_idle(self) -> float | None:
        """Close sessions idle too long; seconds until the next one is due, if any."""
        now = time.monotonic()
        for key, (client, since, _) in list(self._open.items()):
            if now - since >= self.IDLE:
                del self._open[key]
                _quietly_quit(client)
                client.close()
        if not self._open:
            return None
        return max(0.0, min(since for _, since, _ in self._open.values()) + self.IDLE - now)

    def close_all(self) -> None:
        """At exit: say QUIT, then reset rather than linger. A socket left closing after
        its process is gone would keep the tenant's namespace alive for a minute."""
        for client, _, _ in self._open.values():
            if client.sock is not None:  # set first: QUIT closes the socket
                with contextlib.suppress(OSError):
                    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            _quietly_quit(client)
            client.close()
        self._open.clear()


@dataclass(frozen=True, slots=True)
class Agent:
    """Delivers messages for one tenant."""

    tenant: Tenant
    config: DeliveryConfig
    resolver: dns.resolver.Resolver
    tls: ssl.SSLContext | None  # opportunistic: no certificate checks
    tls_verified: ssl.SSLContext  # for destinations whose policy is "verify"
    rng: random.Random
    connections: Connections = field(default_factory=Connections)

    def deliver(self, queue_id: str, envelope: Envelope, message: Message) -> list[Outcome]:
        """Try every recipient of `envelope` once; one outcome per recipient, in order."""
        payload = _Payload(message, eight_bit=not message.is_ascii())
        outcomes: dict[str, Outcome] = {}
        for domain, recipients in _by_domain(envelope.recipients, outcomes).items():
            for outcome in self._deliver_domain(domain, envelope.sender, recipients, payload):
                outcomes[outcome.recipient] = outcome
        return [outcomes[r] for r in dict.fromkeys(envelope.recipients)]

    def _deliver_domain(
        self, domain: str, sender: str, recipients: list[str], payload: _Payload
    ) -> list[Outcome]:
        def all_fail(status: Status, text: str) -> list[Outcome]:
            return [Outcome(r, status, None, text, "") for r in recipients]

        if _BAD_PATH_CHARS.search(sender):
            return all_fail(Status.PERMANENT, "5.1.7 bad sender address")
        try:
            name = _absolute(domain)
        except dns.exception.DNSException as e:
            return all_fail(Status.PERMANENT, f"5.1.2 bad domain {domain}: {e}")
        try:
            targets = self._route(name)
        except dns.resolver.NXDOMAIN:
            return all_fail(Status.PERMANENT, f"5.1.2 domain {domain} does not exist")
        except dns.exception.DNSException as e:
            return all_fail(Status.TEMPORARY, f"4.4.3 MX lookup of {domain} failed: {e}")
        if isinstance(targets, NullMX):
            return all_fail(Status.PERMANENT, f"5.1.10 domain {domain} accepts no mail (null MX)")
        last_error = f"4.4.4 no address found for the mail hosts of {domain}"
        found_any = False
        any_temporary = False
        for host in targets.hosts:
            addresses, temporary = self._addresses(host)
            any_temporary = any_temporary or temporary
            for address in addresses:
                found_any = True
                session = _Session(self, host, address, self._must_verify(domain))
                outcomes = session.send(sender, recipients, payload)
                if outcomes is not None:
                    return outcomes
                last_error = session.error
        if targets.implicit and not found_any and not any_temporary:
            # RFC 5321 5.1: neither MX nor address records: the domain takes no mail.
            return all_fail(Status.PERMANENT, f"5.1.2 domain {domain} has no mail host")
        return all_fail(Status.TEMPORARY, last_error)

    def _must_verify(self, domain: str) -> bool:
        policy = self.tenant.tls or self.config.tls
        return policy == "verify" or domain in self.config.tls_verify

    def _route(self, name: dns.name.Name) -> Targets | NullMX:
        domain = name.to_text()
        try:
            answer = self.resolver.resolve(name, dns.rdatatype.MX, search=False)
        except dns.resolver.NoAnswer:
            return route(domain, None, self.rng)
        mx = [(rdata.preference, rdata.exchange.to_text()) for rdata in answer]
        return route(domain, mx, self.rng)

    def _addresses(self, host: str) -> tuple[list[IPv4Address | IPv6Address], bool]:
        """Addresses of `host` the tenant can reach, IPv6 first; and whether a lookup failed
        temporarily (so "no address" may not be final)."""
        wanted: list[tuple[dns.rdatatype.RdataType, IPv4Address | IPv6Address | None]] = [
            (dns.rdatatype.AAAA, self.tenant.ipv6),
            (dns.rdatatype.A, self.tenant.ipv4),
        ]
        unbound = not self.tenant.addresses  # the host's own mail: the kernel chooses
        addresses: list[IPv4Address | IPv6Address] = []
        temporary = False
        for rdtype, own in wanted:
            if own is None and not unbound:
                continue
            try:
                answer = self.resolver.resolve(_absolute(host), rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                temporary = True
                continue
            addresses.extend(ip_address(rdata.address) for rdata in answer)
        return addresses, temporary


@dataclass(frozen=True, slots=True)
class _Payload:
    message: Message
    eight_bit: bool  # RFC 6152: BODY=8BITMIME is due


class _NextHost(Exception):
    """This host cannot take the message now; another one may. The message says why."""

    @classmethod
    def replied(cls, command: str, code: int, text: bytes) -> _NextHost:
        return cls(f"{code} {_text(text)} (in reply to {command})")


class _Session:
    """One SMTP session to one address of one mail host, new or kept from before."""

    def __init__(
        self, agent: Agent, host: str, address: IPv4Address | IPv6Address, verify: bool
    ) -> None:
        self.agent = agent
        self.host = host
        self.address = address
        self.verify = verify
        port = agent.config.port
        self.relay = f"{host}[{address}]:{port}"
        self.key = (host.lower(), f"{address}:{int(verify)}")
        self.error = ""

    def send(self, sender: str, recipients: list[str], payload: _Payload) -> list[Outcome] | None:
        """Outcomes for `recipients`, or None (see `error`) if another host should be tried."""
        kept = self.agent.connections.take(self.key)
        if kept is not None:
            client, uses = kept
            try:
                return self._finish(
                    client, uses, self._transaction(client, sender, recipients, payload)
                )
            except (_NextHost, smtplib.SMTPException, OSError, ValueError) as e:
                why = self._words(e, client)
                log.info("%s: kept session unusable (%s); reconnecting", self.relay, printable(why))
                client.close()  # it went stale while idle: start afresh, once
        client = self._open_client()
        try:
            self._greet(client)
            outcomes = self._transaction(client, sender, recipients, payload)
            return self._finish(client, 0, outcomes)
        except (_NextHost, smtplib.SMTPException, OSError, ValueError) as e:
            # OSError covers refused connections, timeouts and TLS failures.
            self.error = f"4.4.2 {self.relay}: {self._words(e, client)}"
        log.info("%s", printable(self.error))
        _quietly_quit(client)
        client.close()
        return None

    def _words(self, error: Exception, client: _BoundSMTP) -> str:
        """Why this host could not take the message, for people."""
        if isinstance(error, _NextHost):
            return str(error)
        return neterror.describe(error, client.doing, self.agent.config.timeout)

    def _open_client(self) -> _BoundSMTP:
        tenant = self.agent.tenant
        source = tenant.ipv6 if self.address.version == 6 else tenant.ipv4
        return _BoundSMTP(
            source, self.host, local_hostname=tenant.ehlo, timeout=self.agent.config.timeout
        )

    def _greet(self, client: _BoundSMTP) -> None:
        code, text = client.connect(str(self.address), self.agent.config.port)
        if code != 220:
            raise _NextHost.replied("the greeting", code, text)
        code, text = _ehlo_or_helo(client)
        if code != 250:
            raise _NextHost.replied("EHLO", code, text)
        if not client.has_extn("starttls"):
            if self.verify:  # RFC 3207; policy demands TLS, so no plain text
                raise _NextHost("STARTTLS is not offered, and TLS is required")
            return
        tls = self.agent.tls_verified if self.verify else self.agent.tls
        if tls is None:
            return
        # RFC 3207 with RFC 7435 opportunistic semantics unless verification is required.
        try:
            client.starttls(context=tls)
        except smtplib.SMTPResponseException as e:
            if e.smtp_code < 0:  # not a reply: what was wrong with the one read
                raise
            reply = e.smtp_error if isinstance(e.smtp_error, bytes) else e.smtp_error.encode()
            raise _NextHost.replied("STARTTLS", e.smtp_code, reply) from None
        code, text = _ehlo_or_helo(client)
        if code != 250:
            raise _NextHost.replied("EHLO after STARTTLS", code, text)

    def _finish(self, client: _BoundSMTP, uses: int, outcomes: list[Outcome]) -> list[Outcome]:
        """Keep the session for the next message when it is in a clean state."""
        try:
            if any(o.status != Status.DELIVERED for o in outcomes):
                code, _ = client.rset()  # RFC 5321 4.1.1.5: clear a half-done transaction
                if code != 250:
                    raise OSError("RSET refused")
            self.agent.connections.keep(self.key, client, uses + 1)
        except (smtplib.SMTPException, OSError):
            client.close()
        return outcomes

    def _transaction(
        self, client: _BoundSMTP, sender: str, recipients: list[str], payload: _Payload
    ) -> list[Outcome]:
        limit = _size_limit(client)
        size = payload.message.size
        if limit and size > limit:  # RFC 1870 6.1: the client does not send it
            why = f"5.3.4 message size {size} exceeds the limit {limit} of {self.relay}"
            return self._refused(recipients, why)
        options = _mail_options(client, sender, recipients, payload)
        if options is None:  # RFC 6531 3.4: an address needs SMTPUTF8, which is not offered
            why = f"5.6.7 SMTPUTF8 is required, but {self.relay} does not offer it"
            return self._refused(recipients, why)
        sendable = [r for r in recipients if not _BAD_PATH_CHARS.search(r)]
        rejected = {
            r: Outcome(r, Status.PERMANENT, None, "5.1.3 bad recipient address", self.relay)
            for r in recipients
            if r not in sendable
        }
        (code, text), answers, data = _envelope(client, sender, sendable, options)
        if code != 250:
            _decline_data(client, data)
            if 500 <= code <= 599:
                return [self._outcome(r, code, text) for r in recipients]
            raise _NextHost.replied("MAIL", code, text)
        for recipient, (code, text) in zip(sendable, answers, strict=True):
            if not 200 <= code <= 299:  # RFC 5321 4.2.1: any 2yz takes the recipient
                rejected[recipient] = self._outcome(recipient, code, text)
        if len(rejected) == len(recipients):
            _decline_data(client, data)
            return [rejected[r] for r in recipients]
        try:
            code, text = client.docmd("data") if data is None else data
            if code == 354:
                code, text = _send_message(client, payload.message)
            elif not 400 <= code <= 599:
                # RFC 5321 4.3.2: DATA is answered 354, 4yz or 5yz. The message did not go,
                # so no other reply (a 2yz above all) may pass for the one after the dot.
                return self._lost(recipients, rejected, f"{code} {_text(text)} in reply to DATA")
        except (smtplib.SMTPException, OSError) as e:
            # After RCPT the attempt counts: no other host for these recipients now.
            why = neterror.describe(e, client.doing, self.agent.config.timeout)
            client.close()
            return self._lost(recipients, rejected, why)
        return [rejected.get(r) or self._outcome(r, code, text) for r in recipients]

    def _lost(self, recipients: list[str], rejected: dict[str, Outcome], why: str) -> list[Outcome]:
        failure = f"4.4.2 {self.relay}: {why}"
        return [
            rejected.get(r) or Outcome(r, Status.TEMPORARY, None, failure, self.relay)
            for r in recipients
        ]

    def _outcome(self, recipient: str, code: int, text: bytes) -> Outcome:
        return Outcome(recipient, classify(code), code, _text(text), self.relay)

    def _refused(self, recipients: list[str], text: str) -> list[Outcome]:
        """nsmail's own refusal, from what the server offers: no reply, so no code."""
        return [Outcome(r, Status.PERMANENT, None, text, self.relay) for r in recipients]


def classify(code: int) -> Status:
    """RFC 5321 4.2.1: 2yz done, 5yz permanent, anything else (4yz, garbage) temporary."""
    if 200 <= code <= 299:
        return Status.DELIVERED
    if 500 <= code <= 599:
        return Status.PERMANENT
    return Status.TEMPORARY


class _BoundSMTP(smtplib.SMTP):
    """smtplib connecting from one source address (or any, for the host), to IP literals only.

    No getaddrinfo: after the chroot there is no resolver configuration for glibc, and the
    destination is always an address we resolved ourselves.
    """

    def __init__(
        self,
        source: IPv4Address | IPv6Address | None,
        server_name: str,
        local_hostname: str,
        timeout: float,
    ) -> None:
        self._source = source
        # What the session is doing, to say where it failed (a `neterror` phrase).
        self.doing = neterror.CONNECTING
        super().__init__(local_hostname=local_hostname, timeout=timeout)
        # smtplib's name for the TLS server name (SNI): the MX host, not the IP literal.
        self._host = server_name

    def putcmd(self, cmd: str, args: str = "") -> None:
        """smtplib's every command goes through here: the next thing awaited is its reply."""
        self.doing = neterror.reply_to(cmd.upper())
        super().putcmd(cmd, args)

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's reply reader, made strict. A reply must be complete within the timeout
        and _MAX_REPLY_LINES lines (like Postfix's smtp_per_record_deadline), or a server
        sending continuation lines holds the worker for ever. A line without a valid code,
        or with another code than the first line's (RFC 5321 4.2.1), ends the session:
        where the next reply starts is then unknown, and reading on would take the rest of
        this reply for the answer to the next command."""
        assert self.sock is not None
        if self.file is None:
            self.file = self.sock.makefile("rb")
        deadline = time.monotonic() + self.timeout
        codes: set[bytes] = set()
        texts: list[bytes] = []
        try:
            for _ in range(_MAX_REPLY_LINES):
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                line = self.file.readline(_MAX_REPLY_LINE + 1)
                if not line:
                    raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
                match = _REPLY_LINE.fullmatch(line)
                if match is None or codes - {match[1]}:
                    raise smtplib.SMTPResponseException(-1, b"malformed reply: " + line[:100])
                codes.add(match[1])
                texts.append(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    self.sock.settimeout(self.timeout)
                    if match[1] == b"220" and self.doing == neterror.reply_to("STARTTLS"):
                        self.doing = neterror.TLS_HANDSHAKE  # smtplib starts it right after
                    return int(match[1]), b"\n".join(texts)
            raise smtplib.SMTPResponseException(-1, b"reply of too many lines")
        except (smtplib.SMTPException, OSError):
            self.close()
            raise

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        destination = ip_address(host)
        family = socket.AF_INET6 if destination.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if self._source is not None:
                sock.bind((str(self._source), 0))
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        self.doing = neterror.GREETING
        return sock


def _ehlo_or_helo(client: _BoundSMTP) -> tuple[int, bytes]:
    code, text = client.ehlo()
    if 500 <= code <= 599:
        # RFC 5321 4.1.4: a server that does not know EHLO may still know HELO.
        code, text = client.helo()
    return code, text


def _size_limit(client: _BoundSMTP) -> int:
    """The server's RFC 1870 SIZE limit, 0 when it states none, or none that makes sense."""
    value = client.esmtp_features.get("size", "")
    # RFC 1870 4: 1*20DIGIT. str.isdigit alone takes "²", and int() refuses 5000 digits.
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else 0


def _mail_options(
    client: _BoundSMTP, sender: str, recipients: list[str], payload: _Payload
) -> list[str] | None:
    """MAIL FROM parameters for this message; None if the server cannot take it."""
    options: list[str] = []
    if client.has_extn("size"):
        options.append(f"SIZE={payload.message.size}")  # RFC 1870 3: an estimate
    if payload.eight_bit and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152 2
    if not (sender.isascii() and all(r.isascii() for r in recipients)):
        if not client.has_extn("smtputf8"):
            return None
        options.append("SMTPUTF8")  # RFC 6531 3.4
    return options


Reply = tuple[int, bytes]


def _envelope(
    client: _BoundSMTP, sender: str, recipients: list[str], options: list[str]
) -> tuple[Reply, list[Reply], Reply | None]:
    """The replies to MAIL, to RCPT for each recipient and, when pipelined, to DATA.

    With PIPELINING (RFC 2920) the commands go in one write and the replies are read
    after it, in order, all of them; otherwise one command at a time, stopping at a
    refused MAIL (and DATA is left to the caller: None).
    """
    if client.has_extn("pipelining") and recipients:
        commands = [f"MAIL FROM:{smtplib.quoteaddr(sender)}" + "".join(f" {o}" for o in options)]
        commands += [f"RCPT TO:{smtplib.quoteaddr(r)}" for r in recipients]
        commands.append("DATA")
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"  # RFC 6531 3.2
        client.send("".join(f"{c}\r\n" for c in commands).encode(encoding))
        client.doing = neterror.reply_to("MAIL")
        mail = client.getreply()
        client.doing = neterror.reply_to("RCPT")
        replies = [client.getreply() for _ in recipients]
        client.doing = neterror.reply_to("DATA")
        return mail, replies, client.getreply()
    mail = client.mail(sender, options)
    if mail[0] != 250:
        return mail, [], None
    return mail, [client.rcpt(r) for r in recipients], None


def _decline_data(client: _BoundSMTP, data: Reply | None) -> None:
    """RFC 2920 3.1: a pipelined DATA accepted although nothing else was, ends at once."""
    if data is not None and data[0] == 354:
        client.send(b".\r\n")
        client.getreply()


def _send_message(client: _BoundSMTP, message: Message) -> Reply:
    """The message after a 354, streamed from the queue file (smtplib's `data` wants it
    whole in memory), and the reply to its final dot."""
    # Whole pieces in as few writes as possible, the final dot with the last one: a small
    # write after another waits for its ACK (Nagle), which the server may delay 40 ms.
    pending: list[bytes] = []
    client.doing = neterror.SENDING
    for piece in dot_stuffed(message.wire()):
        pending.append(piece)
        if sum(map(len, pending)) >= CHUNK:
            client.send(b"".join(pending))
            pending = []
    client.send(b"".join([*pending, b".\r\n"]))
    client.doing = neterror.reply_to("the message")
    return client.getreply()


def _quietly_quit(client: _BoundSMTP) -> None:
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.quit()


def _by_domain(recipients: Sequence[str], outcomes: dict[str, Outcome]) -> dict[str, list[str]]:
    """Recipients grouped by lower-case domain; malformed ones get a permanent outcome."""
    groups: dict[str, list[str]] = {}
    for recipient in dict.fromkeys(recipients):
        local, at, domain = recipient.rpartition("@")
        if not at or not local or not domain or _BAD_PATH_CHARS.search(recipient):
            outcomes[recipient] = Outcome(
                recipient, Status.PERMANENT, None, "5.1.3 bad recipient address", ""
            )
            continue
        groups.setdefault(domain.lower(), []).append(recipient)
    return groups


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name, dns.name.root)


def _text(reply: bytes) -> str:
    return reply.decode("utf-8", "replace").replace("\n", " ")


def printable(text: str) -> str:
    """`text` safe for one log line: no control characters."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
