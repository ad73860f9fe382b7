"""The worker's DNS resolver: dnspython speaking to the DNS relay over one SEQPACKET socket.

A worker lives in a network namespace that cannot reach the host's resolver, and after the
chroot it has no resolv.conf either; its only path to DNS is the channel the supervisor
handed to the relay process (see dnsrelay). Each DNS message is one SEQPACKET datagram.

Security: runs as the tenant inside its namespace and chroot. Responses come from the relay
(an unprivileged host process) and are parsed by dnspython, which bounds its own work; a
response must match the query's id and question or it is ignored or rejected.
"""

from __future__ import annotations

import socket
import time

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.resolver

# The relay answers over a datagram socket, so a response is never truncated to 512 or a
# UDP payload size: 65535 is the DNS message limit (RFC 1035 4.2.2 length field).
MAX_MESSAGE = 65535


class RelayNameserver(dns.nameserver.Nameserver):
    """A dnspython nameserver that sends each query over the relay channel."""

    def __init__(self, channel: socket.socket) -> None:
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

    def query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        deadline = time.monotonic() + timeout
        self._channel.settimeout(timeout)
        try:
            self._channel.send(request.to_wire())
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise dns.exception.Timeout(timeout=timeout)  # type: ignore[no-untyped-call]
                self._channel.settimeout(remaining)
                wire = self._channel.recv(MAX_MESSAGE)
                if not wire:
                    raise EOFError("DNS relay closed the channel")
                # A late answer to an earlier query that timed out: skip it.
                if wire[:2] != request.id.to_bytes(2, "big"):
                    continue
                response = dns.message.from_wire(
                    wire, one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing
                )
                if not request.is_response(response):
                    raise dns.query.BadResponse
                return response
        except TimeoutError:
            # dnspython treats OSError as "server broken, stop asking": a timeout is not.
            raise dns.exception.Timeout(timeout=timeout) from None  # type: ignore[no-untyped-call]

    async def async_query(self, *args: object, **kwargs: object) -> dns.message.Message:
        raise NotImplementedError("the relay channel is synchronous")


def make_resolver() -> dns.resolver.Resolver:
    """A caching resolver that reads no files; `use_relay` gives it its nameserver."""
    resolver = dns.resolver.Resolver(configure=False)
    # Only absolute names: no search list derived from the host's name.
    resolver.domain = dns.name.root
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.cache = dns.resolver.LRUCache()
    return resolver


def use_relay(resolver: dns.resolver.Resolver, channel: socket.socket, timeout: float) -> None:
    """Send every query of `resolver` over `channel`, each given `timeout` seconds."""
    resolver.nameservers = [RelayNameserver(channel)]
    resolver.timeout = timeout
    resolver.lifetime = timeout
