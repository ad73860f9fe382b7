"""The worker's DNS resolver: dnspython, asynchronous, speaking to the DNS relay over one
SEQPACKET socket.

A worker lives in a network namespace that cannot reach the host's resolver, and after the
chroot it has no resolv.conf either; its only path to DNS is the channel the supervisor
handed to the relay process (see nsmail.host.dnsrelay). Each DNS message is one SEQPACKET
datagram. Many lookups share the channel at once (every destination of a busy worker):
`RelayChannel` sends each query as it comes (one at a time while the channel is full) and
hands each answer to the query it answers, by id and question, whatever the order the relay
answers in.

Every query asks whether the answer was validated (AD, RFC 6840 5.7) and for its
signatures (DO, RFC 3225); `validated` says whether an answer was. The worker trusts AD
from its relay alone, which is the only DNS it can reach: the relay passes on AD only from
resolvers it trusts to validate (nsmail.host.dnsrelay).

Security: runs as the tenant inside its namespace and chroot. Responses come from the relay
(an unprivileged host process) and are parsed by dnspython, which bounds its own work; a
response that answers no query in flight is dropped.
"""

from __future__ import annotations

import asyncio
import socket

import dns._asyncbackend
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from nsmail.tenant.inflight import InFlight

# The relay answers over a datagram socket, so a response is never truncated to 512 or a
# UDP payload size: 65535 is the DNS message limit (RFC 1035 4.2.2 length field).
MAX_MESSAGE = 65535
# dnspython finds its asyncio backend by importing it on first use, which the chroot
# forbids: it is imported here, before.
BACKEND = dns.asyncbackend.get_backend("asyncio")


class RelayChannel:
    """The worker's end of its relay channel, shared by every query in flight."""

    def __init__(self, channel: socket.socket) -> None:
        channel.setblocking(False)
        self._channel = channel
        self._waiting: dict[
            int, list[tuple[dns.message.Message, asyncio.Future[dns.message.Message]]]
        ] = {}
        self._reading = False
        # asyncio's sock_sendall keeps one waiting writer per socket: with several waiting
        # for room in a full channel, all but the last would wait for ever. One at a time.
        self._sending = asyncio.Lock()

    async def ask(self, request: dns.message.Message, timeout: float) -> dns.message.Message:
        """The relay's answer to `request`, within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dns.message.Message] = loop.create_future()
        waiting = self._waiting.setdefault(request.id, [])
        waiting.append((request, answer))
        try:
            self._read_while_waiting(loop)
            async with asyncio.timeout(timeout):  # sending included: the relay may be stuck
                async with self._sending:
                    await loop.sock_sendall(self._channel, request.to_wire())
                return await answer
        except TimeoutError:
            # dnspython treats OSError as "server broken, stop asking": a timeout is not.
            raise dns.exception.Timeout(timeout=timeout) from None  # type: ignore[no-untyped-call]
        finally:
            waiting.remove((request, answer))
            if not waiting:
                del self._waiting[request.id]
            if not self._waiting and self._reading:
                loop.remove_reader(self._channel)
                self._reading = False

    def _read_while_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._reading:
            loop.add_reader(self._channel, self._readable)
            self._reading = True

    def _readable(self) -> None:
        while True:
            try:
                wire = self._channel.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError as e:
                self._fail_all(e)
                return
            if not wire:
                self._fail_all(EOFError("the DNS relay closed the channel"))
                return
            self._deliver(wire)

    def _deliver(self, wire: bytes) -> None:
        waiting = self._waiting.get(int.from_bytes(wire[:2], "big"), [])
        if not waiting:
            return  # a late answer to a query that timed out
        try:
            header = dns.message.from_wire(wire, question_only=True)
        except Exception:  # whatever dnspython finds wrong with the bytes: no answer
            return
        for request, answer in waiting:
            if not answer.done() and request.is_response(header):
                # The relay passes the resolver's response on as it came: one that does
                # not parse is the nameserver's failure (the resolver gives up at once).
                try:
                    answer.set_result(dns.message.from_wire(wire))
                except Exception:  # whatever dnspython finds wrong with the bytes
                    malformed = dns.exception.FormError(  # type: ignore[no-untyped-call]
                        "the response is malformed"
                    )
                    answer.set_exception(malformed)
                return

    def _fail_all(self, error: Exception) -> None:
        for waiting in self._waiting.values():
            for _, answer in waiting:
                if not answer.done():
                    answer.set_exception(error)


class RelayNameserver(dns.nameserver.Nameserver):
    """A dnspython nameserver that asks the relay, for the asynchronous resolver."""

    def __init__(self, channel: RelayChannel) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._channel = channel

    def __str__(self) -> str:
        return "relay"

    def kind(self) -> str:
        return "relay"

    def is_always_max_size(self) -> bool:
        # The relay does its own TCP fallback; the resolver must never retry "with TCP".
        return True

    def answer_nameserver(self) -> str:
        return "relay"

    def answer_port(self) -> int:
        return 0

    def query(self, *args: object, **kwargs: object) -> dns.message.Message:
        raise NotImplementedError("the relay is asked asynchronously")

    async def async_query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        backend: dns._asyncbackend.Backend,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        # Parsed once, where it is matched to its query: dnspython's resolver asks with
        # neither option, and `from_wire` is most of a lookup's cost.
        assert not (one_rr_per_rrset or ignore_trailing), "the relay parses with defaults"
        return await self._channel.ask(request, timeout)


class Resolver(dns.asyncresolver.Resolver):
    """dnspython's asynchronous resolver with `lookup`: one query in flight per question."""

    def __init__(self) -> None:
        super().__init__(configure=False)
        self._asking: InFlight[
            tuple[dns.name.Name, dns.rdatatype.RdataType], dns.resolver.Answer
        ] = InFlight()

    async def lookup(
        self, name: dns.name.Name | str, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer:
        """The answer for `name` (absolute) and `rdtype`, shared by every caller asking while
        it is on its way: sessions opened at once to one new destination would each ask
        before the first answer is in the cache. Raises dnspython's exceptions."""
        qname = dns.name.from_text(name, dns.name.root) if isinstance(name, str) else name
        return await self._asking.get(
            (qname, rdtype), lambda: self.resolve(qname, rdtype, search=False, backend=BACKEND)
        )


def make_resolver() -> Resolver:
    """A caching resolver that reads no files; `use_relay` gives it its nameserver."""
    resolver = Resolver()
    # Only absolute names: no search list derived from the host's name.
    resolver.domain = dns.name.root
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.cache = dns.resolver.LRUCache()
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.use_edns(0, dns.flags.DO, MAX_MESSAGE)
    return resolver


async def texts(resolver: Resolver, name: str) -> list[str]:
    """The TXT records of `name`, each its strings joined (RFC 7208 3.3's way); none when
    there are none, or the lookup failed."""
    try:
        answer = await resolver.lookup(name, dns.rdatatype.TXT)
    except dns.exception.DNSException:
        return []
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


def validated(answer: dns.resolver.Answer) -> bool:
    """Whether the relay vouches that `answer` was validated with DNSSEC (its AD bit)."""
    return bool(answer.response.flags & dns.flags.AD)


def use_relay(resolver: Resolver, channel: socket.socket, timeout: float) -> None:
    """Send every query of `resolver` over `channel`, each given `timeout` seconds."""
    resolver.nameservers = [RelayNameserver(RelayChannel(channel))]
    resolver.timeout = timeout
    resolver.lifetime = timeout
