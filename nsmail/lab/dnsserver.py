"""A small authoritative DNS server for the lab: a fixed set of records, served over UDP and TCP.

For a name inside its zones it answers authoritatively (AA): the planted records; NODATA
for a name that exists without the asked type, or only has names below it (RFC 8020 2);
NXDOMAIN for any other name; negative answers carry the zone's SOA (RFC 2308 3). A name
outside its zones is REFUSED: the server never recurses. Each zone holds its SOA and the
planted records, nothing else (no NS: lab resolvers are pointed at this server directly).

Records are ``(name, type, value)`` triples: A, AAAA, MX, PTR, TXT or any type dnspython
knows, the value in zone-file text where every name is absolute whether or not it ends in
a dot (``("rcpt.test", "MX", "10 mx.rcpt.test")``), except TXT values, which are the text
itself. A PTR record may name its address instead of its reverse name
(``("203.0.113.25", "PTR", "mx.rcpt.test")``). TTLs are 1 s, so a restarted server's
new records show at once to any caching client.

Run as a process, ``python -m nsmail.lab.dnsserver --records FILE.json --listen ADDR:PORT
...`` reads the records as a JSON list of ``[name, type, value]`` lists, prints ``ready``
once every address is bound, and serves until SIGTERM or SIGINT.

Security: test and demo infrastructure, run inside a lab network namespace (as root in the
demo, to bind port 53). Queries are untrusted bytes parsed by dnspython; a malformed one or
a response is dropped unanswered, a TCP client gets a bounded idle time per message. The
records are trusted: they come from the demo or the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from .serving import Endpoint, LabServer, parse_endpoint

LAB_ZONES = ("test", "in-addr.arpa", "ip6.arpa")
TTL = 1
TCP_IDLE_TIMEOUT = 10.0
# RFC 1035 2.3.4: the classic UDP limit, for a query without EDNS.
UDP_PLAIN_SIZE = 512
IN = dns.rdataclass.IN

Record = tuple[str, str, str]
RRsetKey = tuple[dns.name.Name, dns.rdatatype.RdataType]


@dataclass(frozen=True, slots=True)
class Zones:
    """The served RRsets by owner and type, and the zone origins, deepest first."""

    origins: tuple[dns.name.Name, ...]
    rrsets: Mapping[RRsetKey, dns.rrset.RRset]

    def origin_of(self, name: dns.name.Name) -> dns.name.Name | None:
        return next((origin for origin in self.origins if name.is_subdomain(origin)), None)

    def has_name(self, name: dns.name.Name) -> bool:
        return any(owner.is_subdomain(name) for owner, _ in self.rrsets)


def reverse_name(address: str) -> str:
    """The PTR owner name of an IPv4 or IPv6 address, without the final dot."""
    return ipaddress.ip_address(address).reverse_pointer


def forward_and_reverse(name: str, address: str) -> list[Record]:
    """The A or AAAA record of `name` and the PTR record pointing `address` back to it."""
    rtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
    return [(name, rtype, address), (reverse_name(address), "PTR", name)]


def load(records: Iterable[Record], zones: Iterable[str] = LAB_ZONES) -> Zones:
    """The zones holding `records`; raises ValueError for a record outside them or malformed."""
    origins = tuple(sorted((dns.name.from_text(z) for z in zones), key=len, reverse=True))
    rdatas: dict[RRsetKey, list[dns.rdata.Rdata]] = {}
    for origin in origins:
        soa = f"{origin} hostmaster.{origin} 1 3600 600 86400 {TTL}"
        rdatas[(origin, dns.rdatatype.SOA)] = [_rdata(dns.rdatatype.SOA, soa)]
    for name, rtype, value in records:
        try:
            rdtype = dns.rdatatype.RdataType.make(rtype)
            owner, rdata = _owner(name, rdtype), _rdata(rdtype, value)
        except dns.exception.DNSException as error:
            raise ValueError(f"{name} {rtype} {value!r}: {error}") from error
        if not any(owner.is_subdomain(origin) for origin in origins):
            raise ValueError(f"{name} {rtype}: in none of the zones {', '.join(map(str, origins))}")
        rdatas.setdefault((owner, rdtype), []).append(rdata)
    rrsets = {key: dns.rrset.from_rdata_list(key[0], TTL, rds) for key, rds in rdatas.items()}
    return Zones(origins, rrsets)


def _owner(name: str, rdtype: dns.rdatatype.RdataType) -> dns.name.Name:
    if rdtype == dns.rdatatype.PTR:
        with contextlib.suppress(ValueError):
            return dns.name.from_text(reverse_name(name))
    return dns.name.from_text(name)


def _rdata(rdtype: dns.rdatatype.RdataType, value: str) -> dns.rdata.Rdata:
    if rdtype == dns.rdatatype.TXT:
        raw = value.encode()
        # RFC 1035 3.3.14: a TXT record is a sequence of strings of at most 255 octets each.
        chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(IN, rdtype, chunks)
    return dns.rdata.from_text(IN, rdtype, value, origin=dns.name.root, relativize=False)


def respond(zones: Zones, wire: bytes, udp: bool) -> bytes | None:
    """The wire response to the query `wire`; None when it deserves no answer."""
    try:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)  # raises for a response (QR set)
    except dns.exception.DNSException:
        return None
    response.set_rcode(_answer(zones, query, response))
    if udp:
        # RFC 6891 6.2.5: fit the requester's UDP payload size, else truncate (TC).
        limit = max(UDP_PLAIN_SIZE, query.payload)
        return response.to_wire(max_size=limit, prefer_truncation=True)
    return response.to_wire(max_size=65535)


def _answer(
    zones: Zones, query: dns.message.Message, response: dns.message.Message
) -> dns.rcode.Rcode:
    if query.opcode() != dns.opcode.QUERY:
        return dns.rcode.NOTIMP
    if len(query.question) != 1:
        return dns.rcode.FORMERR
    question = query.question[0]
    origin = zones.origin_of(question.name)
    if question.rdclass != IN or origin is None:
        return dns.rcode.REFUSED
    response.flags |= dns.flags.AA
    rrset = zones.rrsets.get((question.name, question.rdtype))
    if rrset is not None:
        response.answer.append(rrset)
        return dns.rcode.NOERROR
    response.authority.append(zones.rrsets[(origin, dns.rdatatype.SOA)])
    return dns.rcode.NOERROR if zones.has_name(question.name) else dns.rcode.NXDOMAIN


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, zones: Zones) -> None:
        self._zones = zones
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = respond(self._zones, data, udp=True)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


class DnsServer(LabServer):
    """Serves `records` authoritatively for `zones` on every `listen` address, UDP and TCP."""

    def __init__(
        self,
        records: Iterable[Record],
        listen: Sequence[Endpoint],
        zones: Iterable[str] = LAB_ZONES,
    ) -> None:
        super().__init__()
        self._zones = load(records, zones)
        self._listen = tuple(listen)

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self._listen:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self._zones), local_addr=(host, port)
            )
            stack.callback(transport.close)
            server = await asyncio.start_server(self._stream, host, port)
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    # RFC 1035 4.2.2: over TCP each message is preceded by its two-byte length.
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    reply = respond(self._zones, await reader.readexactly(length), udp=False)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def records_from_json(text: str) -> list[Record]:
    """The records of a JSON list of ``[name, type, value]`` lists; ValueError if malformed."""
    data = json.loads(text)
    if not isinstance(data, list) or not all(
        isinstance(r, list) and len(r) == 3 and all(isinstance(f, str) for f in r) for r in data
    ):
        raise ValueError("records must be a JSON list of [name, type, value] string lists")
    return [(name, rtype, value) for name, rtype, value in data]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nsmail.lab.dnsserver", description="Serve lab DNS records."
    )
    parser.add_argument("--records", type=Path, required=True, help="JSON [[name, type, value]]")
    parser.add_argument(
        "--listen", type=parse_endpoint, action="append", required=True, metavar="ADDR:PORT"
    )
    args = parser.parse_args(argv)
    server = DnsServer(records_from_json(args.records.read_text()), args.listen)
    server.serve_forever(ready=lambda: print("ready", flush=True))


if __name__ == "__main__":
    main()
