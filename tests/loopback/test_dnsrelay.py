"""The DNS relay and the worker's resolver, end to end over real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
from dns_servers import DNSStack, dns_stack, resolve

from nsmail.host import dnsrelay
from nsmail.tenant.resolver import BACKEND, make_resolver, use_relay, validated


@pytest.fixture
def stack() -> Iterator[DNSStack]:
    with dns_stack() as s:
        yield s


def _ask(channel: socket.socket, query: dns.message.Message | bytes) -> dns.message.Message:
    channel.send(query if isinstance(query, bytes) else query.to_wire())
    channel.settimeout(5)
    return dns.message.from_wire(channel.recv(65535))


def test_mx_and_address_lookups(stack: DNSStack) -> None:
    resolver = stack.resolver()
    mx = resolve(resolver, "rcpt.test.", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in mx] == [(10, "mx.rcpt.test.")]
    assert [r.address for r in resolve(resolver, "mx.rcpt.test.", "A")] == ["127.0.0.1"]
    assert [r.address for r in resolve(resolver, "mx.rcpt.test.", "AAAA")] == ["::1"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(resolver, "nowhere.test.", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(resolver, "rcpt.test.", "A")


def test_truncated_answers_are_fetched_over_tcp(stack: DNSStack) -> None:
    answer = resolve(stack.resolver(), "big.rcpt.test.", "A")
    assert len(answer) == 119
    assert ("big.rcpt.test.", "A", False) in stack.server.queries


def test_queries_are_answered_from_the_cache(stack: DNSStack) -> None:
    resolver = stack.resolver()
    resolve(resolver, "rcpt.test.", "MX")
    resolve(resolver, "rcpt.test.", "MX")
    assert stack.server.queries.count(("rcpt.test.", "MX", True)) == 1


def test_lookups_at_once_share_one_channel(stack: DNSStack) -> None:
    """A busy worker asks for many destinations at once over its one channel: each
    answer reaches the lookup it answers, whatever order the relay answers in."""
    resolver = stack.resolver()
    resolver.cache = None  # every lookup goes to the relay
    names = [("mx.rcpt.test.", "A"), ("mx.rcpt.test.", "AAAA"), ("rcpt.test.", "MX")] * 10

    async def all_at_once() -> list[dns.resolver.Answer]:
        lookups = [resolver.resolve(n, t, backend=BACKEND) for n, t in names]
        return await asyncio.gather(*lookups)

    answers = asyncio.run(all_at_once())
    assert [(str(a.qname), dns.rdatatype.to_text(a.rdtype)) for a in answers] == names
    assert [a[0].to_text() for a in answers[:3]] == ["127.0.0.1", "::1", "10 mx.rcpt.test."]


def test_more_lookups_at_once_than_the_channel_holds_all_end(stack: DNSStack) -> None:
    """Hundreds of lookups at once (a worker taking 500 messages routes them all) fill the
    channel's send buffer: every one still ends, none waits for ever to be sent."""
    resolver = stack.resolver()
    resolver.cache = None
    lookups = 500

    async def all_at_once() -> list[dns.resolver.Answer]:
        asks = [resolver.resolve("rcpt.test.", "MX", backend=BACKEND) for _ in range(lookups)]
        # Bounded here, so that a lookup stuck before its own timeout fails the test.
        return await asyncio.wait_for(asyncio.gather(*asks), timeout=30)

    answers = asyncio.run(all_at_once())
    assert len(answers) == lookups
    assert {a[0].to_text() for a in answers} == {"10 mx.rcpt.test."}


def test_only_plain_in_queries_are_relayed(stack: DNSStack) -> None:
    channel = stack.channel()
    chaos = dns.message.make_query("version.bind.", "TXT", "CH")
    assert _ask(channel, chaos).rcode() == dns.rcode.REFUSED
    update = dns.message.make_query("rcpt.test.", "MX")
    update.set_opcode(dns.opcode.UPDATE)
    assert _ask(channel, update).rcode() == dns.rcode.NOTIMP
    axfr = dns.message.make_query("rcpt.test.", "AXFR")
    assert _ask(channel, axfr).rcode() == dns.rcode.REFUSED
    two = dns.message.make_query("rcpt.test.", "MX")
    two.question.append(two.question[0])
    assert _ask(channel, two).rcode() == dns.rcode.REFUSED
    garbage = b"\x12\x34\x01\x00" + os.urandom(8) + b"\xff" * 20
    assert _ask(channel, garbage).rcode() == dns.rcode.FORMERR
    query = dns.message.make_query("rcpt.test.", "MX")
    response = _ask(channel, query)
    assert response.id == query.id and query.is_response(response)
    assert stack.server.queries == [("rcpt.test.", "MX", True)]


def test_garbage_flood_and_eof_on_one_channel_spare_the_others(stack: DNSStack) -> None:
    bad = stack.channel()
    good = stack.resolver()
    for size in (0 + 1, 11, 12, 200, 512, 513, 4000):
        bad.send(os.urandom(size))
    query = dns.message.make_query("rcpt.test.", "MX")
    bad.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(2000):  # far beyond the in-flight bound, never reading answers
            bad.send(query.to_wire())
    assert resolve(good, "mx.rcpt.test.", "A")[0].address == "127.0.0.1"
    bad.close()
    assert resolve(good, "mx.rcpt.test.", "AAAA")[0].address == "::1"
    assert stack.relay_alive()


def test_a_descriptor_that_is_no_channel_is_dropped(stack: DNSStack) -> None:
    read_end, write_end = os.pipe()
    stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        socket.send_fds(stack.control, [b"c"], [read_end, stream_a.fileno()])
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        stream_a.close()
        stream_b.close()
    assert resolve(stack.resolver(), "rcpt.test.", "MX")[0].preference == 10


def test_resolvers_are_tried_in_turn_and_failure_is_servfail() -> None:
    dead = IPv4Address("127.0.0.2")  # nothing listens there: refused at once
    with dns_stack(resolvers=(dead, IPv4Address("127.0.0.1")), timeout=0.2) as s:
        assert resolve(s.resolver(), "rcpt.test.", "MX")[0].preference == 10
    with dns_stack(resolvers=(dead,), timeout=0.2) as s:
        response = _ask(s.channel(), dns.message.make_query("rcpt.test.", "MX"))
        assert response.rcode() == dns.rcode.SERVFAIL
        with pytest.raises(dns.resolver.NoNameservers):
            resolve(s.resolver(), "rcpt.test.", "MX")


def test_relay_gone_fails_fast() -> None:
    with dns_stack() as s:
        resolver = s.resolver()
        s.control.close()
        assert s.wait_relay() == 0
        started = time.monotonic()
        with pytest.raises(dns.resolver.NoNameservers):
            resolve(resolver, "rcpt.test.", "MX")
        assert time.monotonic() - started < 1


def test_relay_returns_when_control_reaches_eof() -> None:
    with dns_stack() as s:
        resolver = s.resolver()
        assert resolve(resolver, "rcpt.test.", "MX")[0].preference == 10
        s.control.shutdown(socket.SHUT_WR)
        assert s.wait_relay() == 0


def test_a_ping_is_answered_on_the_control_socket(stack: DNSStack) -> None:
    """What the supervisor's health check asks: the relay's loop answers, between queries."""
    resolver = stack.resolver()
    stack.control.settimeout(5)
    for _ in range(3):
        dnsrelay.ping(stack.control)
        assert stack.control.recv(16) == dnsrelay.PING
        assert resolve(resolver, "rcpt.test.", "MX")[0].preference == 10


@pytest.mark.parametrize("validating", [True, False])
def test_dnssec_wishes_go_upstream_and_ad_comes_back_from_a_loopback_resolver(
    validating: bool,
) -> None:
    with dns_stack(validating=validating) as stack:
        answer = resolve(stack.resolver(), "rcpt.test.", "MX")
        # The worker asks for AD and DO; the relay asks the resolver for both.
        assert stack.server.dnssec_wishes == [(True, True)]
        assert validated(answer) is validating


def test_ad_is_believed_only_from_resolvers_on_the_loopback() -> None:
    # RFC 6840 5.7: only over a path nobody else can write to; elsewhere it is cleared.
    assert dnsrelay.trusts_ad("127.0.0.1") and dnsrelay.trusts_ad("::1")
    assert not dnsrelay.trusts_ad("203.0.113.53") and not dnsrelay.trusts_ad("2001:db8::53")


def test_the_same_question_asked_at_once_goes_out_once(stack: DNSStack) -> None:
    """Sessions opened at once to a new destination each look up its addresses before the
    first answer is cached: they share the one lookup in flight."""
    resolver = stack.resolver()

    async def all_at_once() -> list[dns.resolver.Answer]:
        return await asyncio.gather(
            *(resolver.lookup("mx.rcpt.test.", dns.rdatatype.A) for _ in range(5))
        )

    answers = asyncio.run(all_at_once())
    assert {a[0].to_text() for a in answers} == {"127.0.0.1"}
    assert stack.server.queries.count(("mx.rcpt.test.", "A", True)) == 1


def test_an_answer_that_does_not_parse_fails_the_lookup_at_once() -> None:
    """The relay passes a resolver's response on as it came, once its id and question
    match: one whose records do not parse is that nameserver's failure, not a wait."""
    worker_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    resolver = make_resolver()
    use_relay(resolver, worker_end, 30.0)  # a wait for the timeout would end in Timeout

    def answer_cut_short() -> None:
        query = dns.message.from_wire(relay_end.recv(65535))
        response = dns.message.make_response(query)
        response.answer.append(
            dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "127.0.0.1")
        )
        wire = response.to_wire()
        relay_end.send(wire[:-3])  # the question whole, the address cut

    with worker_end, relay_end:
        thread = threading.Thread(target=answer_cut_short, daemon=True)
        thread.start()
        with pytest.raises(dns.resolver.NoNameservers):
            asyncio.run(resolver.lookup("mx.rcpt.test.", dns.rdatatype.A))
        thread.join(5)
