"""Hostile DNS answers, fuzzed: the relay against a hostile upstream, and the worker's resolver
and MX routing (the real delivery engine) against a hostile relay.

Every address an answer may carry is on 127.0.0.0/8: answers are built here, and a filter
replaces any message holding another A or AAAA record with SERVFAIL before it is sent, so
no drawn answer can send a connection off this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from dns_servers import udp_and_tcp
from engine_harness import Harness
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from loopback_tenant import make_tenant
from scripted_smtp import ScriptedServer, timeouts, tls_contexts

from nsmail.core.config import DeliveryConfig
from nsmail.core.message import Message
from nsmail.core.outcome import Status
from nsmail.core.queuefile import Envelope
from nsmail.core.routing import NullMX, Targets, route
from nsmail.host import dnsrelay
from nsmail.tenant.resolver import make_resolver, use_relay

DOMAIN = "dest.test."
NAMES = [DOMAIN, "mx.dest.test.", "other.test.", "loop.dest.test.", "127.0.0.1.", "."]
LOOPBACK_A = ["127.0.0.1", "127.0.0.3"]  # 127.0.0.1 has the SMTP server; .3 refuses

# --- hostile messages --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """How to answer one query: an rcode and records, then what to break in the wire."""

    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    records: tuple[tuple[str, str, str], ...] = ()  # (owner, type, rdata); "" owner: qname
    ttl: int = 300
    mangle: str = "none"  # see MANGLES
    noise: bytes = b""


MANGLES = ("none", "id", "question", "truncate", "tc", "random", "drop", "twice")
RECORDS = st.one_of(
    st.tuples(st.just(""), st.just("MX"), st.sampled_from(["0 .", "10 mx.dest.test.", "10 ."])),
    st.tuples(
        st.just(""),
        st.just("MX"),
        st.builds(
            "{} {}".format, st.integers(0, 65535), st.sampled_from([*NAMES, "\\000.dest.test."])
        ),
    ),
    st.tuples(st.sampled_from(["", "mx.dest.test."]), st.just("A"), st.sampled_from(LOOPBACK_A)),
    st.tuples(st.just(""), st.just("AAAA"), st.just("::1")),
    st.tuples(st.just(""), st.just("CNAME"), st.sampled_from(["loop.dest.test.", DOMAIN])),
    st.tuples(st.just("loop.dest.test."), st.just("CNAME"), st.sampled_from([DOMAIN, "x.test."])),
    st.tuples(st.just("other.test."), st.just("MX"), st.just("10 mx.dest.test.")),
    st.tuples(st.just(""), st.just("TXT"), st.just('"v=spf1 -all"')),
)
MANY_MX = tuple(("", "MX", f"{i % 7} mx{i}.dest.test.") for i in range(1000))
ANSWERS = st.builds(
    Answer,
    rcode=st.sampled_from(
        [dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED]
    ),
    records=st.one_of(st.lists(RECORDS, max_size=5).map(tuple), st.just(MANY_MX)),
    ttl=st.sampled_from([0, 300, 2**31 - 1, 2**32 - 1]),
    # "drop" and "id" cost a timeout each: answers mostly arrive.
    mangle=st.sampled_from(("none",) * 6 + MANGLES),
    noise=st.binary(max_size=64),
)


def build(query: dns.message.Message, answer: Answer) -> bytes | None:
    """The wire answer to `query` as `answer` says, or None for no answer at all."""
    if answer.mangle == "drop":
        return None
    if answer.mangle == "random":
        return query.id.to_bytes(2, "big") + answer.noise
    response = dns.message.make_response(query)
    response.set_rcode(answer.rcode)
    question = query.question[0]
    for owner, rdtype, rdata in answer.records:
        name = dns.name.from_text(owner) if owner else question.name
        response.answer.append(dns.rrset.from_text(name, answer.ttl, "IN", rdtype, rdata))
    if answer.mangle == "question":
        response.question = [
            dns.rrset.RRset(dns.name.from_text("other.test."), question.rdclass, question.rdtype)
        ]
    if answer.mangle == "tc":
        response.flags |= dns.flags.TC
    wire = response.to_wire(max_size=65535)
    if answer.mangle == "id":
        wire = ((query.id + 1) % 65536).to_bytes(2, "big") + wire[2:]
    if answer.mangle == "truncate":
        wire = wire[: max(2, len(wire) // 2)]
    return wire


def off_machine(wire: bytes) -> bool | None:
    """Whether a message that parses holds an address beyond loopback (None: no parse)."""
    try:
        message = dns.message.from_wire(wire, ignore_trailing=True)
    except Exception:
        return None
    return any(
        rdataset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        and not ip_address(rdata.address).is_loopback
        for section in (message.answer, message.authority, message.additional)
        for rdataset in section
        for rdata in rdataset
    )


def safe(wire: bytes | None) -> bytes | None:
    if wire is not None and off_machine(wire):
        return None
    return wire


# --- the relay against a hostile upstream -------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _UDP | _TCP

    def handle(self) -> None:
        upstream = self.server.upstream
        if isinstance(self.server, _UDP):
            data, sock = self.request
            reply = upstream.reply(data, udp=True)
            if reply is not None:
                sock.sendto(reply, self.client_address)
            return
        sock = self.request
        with contextlib.suppress(OSError, struct.error):
            length = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
            reply = upstream.reply(sock.recv(length, socket.MSG_WAITALL), udp=False)
            if reply is not None:
                # A TCP answer may also lie about its length.
                sock.sendall(struct.pack("!H", len(reply) + upstream.tcp_skew) + reply)


class _UDP(socketserver.ThreadingUDPServer):
    upstream: HostileUpstream
    daemon_threads = True


class _TCP(socketserver.ThreadingTCPServer):
    upstream: HostileUpstream
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class HostileUpstream:
    """A resolver on 127.0.0.1 (UDP and TCP, one port) answering as `udp` and `tcp` say."""

    udp: Answer = field(default_factory=Answer)
    tcp: Answer = field(default_factory=Answer)
    tcp_skew: int = 0

    def __post_init__(self) -> None:
        udp, tcp = udp_and_tcp(_UDP, _TCP, _Handler)
        self.servers = (udp, tcp)
        udp.upstream = tcp.upstream = self
        self.port: int = udp.server_address[1]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def reply(self, wire: bytes, udp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        return build(query, self.udp if udp else self.tcp)

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[HostileUpstream]:
    made = HostileUpstream()
    try:
        yield made
    finally:
        made.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rdtype=st.sampled_from(["MX", "A", "AAAA"]),
    udp=ANSWERS,
    tcp=ANSWERS,
    tcp_skew=st.sampled_from([0, 0, -1, 1, 1000]),
)
@example(rdtype="MX", udp=Answer(mangle="tc"), tcp=Answer(records=MANY_MX), tcp_skew=0)
@example(rdtype="MX", udp=Answer(mangle="tc"), tcp=Answer(mangle="random"), tcp_skew=1000)
def test_relay_answers_every_upstream_with_a_matching_response_or_nothing(
    upstream: HostileUpstream, rdtype: str, udp: Answer, tcp: Answer, tcp_skew: int
) -> None:
    upstream.udp, upstream.tcp, upstream.tcp_skew = udp, tcp, tcp_skew
    query = dns.message.make_query(DOMAIN, rdtype)
    started = time.monotonic()
    reply = asyncio.run(dnsrelay.respond(query.to_wire(), ("127.0.0.1",), 0.2, upstream.port))
    # One UDP and one TCP attempt, each bounded by the timeout.
    assert time.monotonic() - started < 3.0
    assert reply is not None  # a query that parses always gets an answer
    # Its id and question, whatever upstream said; the rest is passed on as it came (the
    # worker's resolver fails a lookup whose answer does not parse: see below).
    assert query.is_response(dns.message.from_wire(reply, question_only=True))
    assert reply[3] & 0x0F in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL)
    if {udp.mangle, tcp.mangle} <= {"none", "twice"}:
        response = dns.message.from_wire(reply)  # well-formed in, well-formed out
        if udp.rcode == dns.rcode.REFUSED:
            assert response.rcode() == dns.rcode.SERVFAIL


# --- the worker's resolver and routing against a hostile relay ------------------------------


@dataclass
class HostileRelay:
    """The relay's end of a worker's channel, answering each (name, type) as `plan` says."""

    plan: dict[tuple[str, str], Answer]
    asked: list[tuple[str, str]] = field(default_factory=list)

    def serve(self, channel: socket.socket) -> None:
        with channel, contextlib.suppress(OSError):
            while wire := channel.recv(65535):
                query = dns.message.from_wire(wire)
                question = query.question[0]
                key = (question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype))
                self.asked.append(key)
                answer = self.plan.get(key, Answer(rcode=dns.rcode.NXDOMAIN))
                if answer.mangle == "twice":  # a stale answer first, then the real one
                    stale = dns.message.make_response(query)
                    channel.send(((query.id + 7) % 65536).to_bytes(2, "big") + stale.to_wire()[2:])
                reply = safe(build(query, answer))
                if reply is not None:
                    channel.send(reply)


PLANS = st.dictionaries(
    st.tuples(
        st.sampled_from([DOMAIN, "mx.dest.test.", "loop.dest.test.", "mx1.dest.test."]),
        st.sampled_from(["MX", "A"]),
    ),
    ANSWERS,
    max_size=4,
)
MESSAGE = Message.of(b"Subject: dns\n\nhello\n")


@pytest.fixture(scope="module")
def smtp() -> Iterator[ScriptedServer]:
    made = ScriptedServer()
    try:
        yield made
    finally:
        made.close()


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=PLANS)
@example(plan={(DOMAIN, "MX"): Answer(records=(("", "CNAME", "loop.dest.test."),))})
@example(plan={(DOMAIN, "MX"): Answer(records=(("", "MX", f"10 {DOMAIN}"),))})
@example(plan={(DOMAIN, "MX"): Answer(records=(("", "MX", "10 \\000.dest.test."),))})
@example(plan={(DOMAIN, "MX"): Answer(records=(("", "MX", "10 127.0.0.1."),))})
@example(plan={(DOMAIN, "MX"): Answer(records=MANY_MX)})
def test_agent_ends_every_dns_answer_in_a_defined_outcome(
    smtp: ScriptedServer, tmp_path: Path, plan: dict[tuple[str, str], Answer]
) -> None:
    smtp.reset({})
    worker_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    relay = HostileRelay(plan)
    thread = threading.Thread(target=relay.serve, args=(relay_end,), daemon=True)
    thread.start()
    resolver = make_resolver()
    use_relay(resolver, worker_end, 0.3)
    config = DeliveryConfig(port=smtp.port, timeout=2.0, smtp_timeouts=timeouts(2.0))
    agent = Harness(make_tenant(tmp_path), config, resolver, verifying=tls_contexts()[1])
    started = time.monotonic()
    try:
        (outcome,) = agent.deliver("q", Envelope("s@tenant.test", ("x@dest.test",)), MESSAGE)
    finally:
        agent.close()
        worker_end.close()
        thread.join(5)
    elapsed = time.monotonic() - started
    assert isinstance(outcome.status, Status)
    # Each lookup is bounded by the resolver's lifetime; there are at most MX + 2 per host.
    assert elapsed < 0.3 * (1 + 2 * len(relay.asked)) + 3.0, (elapsed, relay.asked)
    delivered = [e for e in smtp.transcript if e.stage == "DOT"]
    assert (outcome.status == Status.DELIVERED) == bool(delivered), (outcome, relay.asked)
    mx = plan.get((DOMAIN, "MX"), Answer(rcode=dns.rcode.NXDOMAIN))
    if mx.mangle == "none" and mx.rcode == dns.rcode.NXDOMAIN and not mx.records:
        assert outcome.status == Status.PERMANENT, outcome
    if mx.mangle == "none" and mx.rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
        assert outcome.status == Status.TEMPORARY, outcome
    if (
        mx.mangle in ("none", "twice")
        and mx.rcode == dns.rcode.NOERROR
        and mx.records == (("", "MX", "0 ."),)
    ):
        assert outcome.status == Status.PERMANENT and "null MX" in outcome.text, outcome
    if mx.mangle in ("drop", "id", "question", "truncate"):
        assert outcome.status == Status.TEMPORARY, outcome


# --- the routing decision itself ----------------------------------------------------------

EXCHANGES = st.one_of(
    st.sampled_from([".", "dest.test.", "DEST.test", "127.0.0.1.", "mx.dest.test.", "a..b"]),
    st.text(max_size=20),
)


@settings(max_examples=300)
@given(
    domain=st.sampled_from(["dest.test", "dest.test.", "DEST.TEST"]),
    mx=st.one_of(st.none(), st.lists(st.tuples(st.integers(0, 65535), EXCHANGES), max_size=50)),
    seed=st.integers(),
)
def test_route_orders_any_mx_answer(
    domain: str, mx: list[tuple[int, str]] | None, seed: int
) -> None:
    result = route(domain, mx, random.Random(seed))
    real = [(p, e.rstrip(".").lower()) for p, e in mx or [] if e.rstrip(".")]
    if not mx:
        assert result == Targets(("dest.test",), implicit=True)
    elif not real:
        assert result == NullMX()  # RFC 7505 3: only "." exchanges
    else:
        assert isinstance(result, Targets) and not result.implicit
        assert sorted(result.hosts) == sorted({host for _, host in real})
        best = {host: min(p for p, h in real if h == host) for _, host in real}
        assert [best[h] for h in result.hosts] == sorted(best[h] for h in result.hosts)
