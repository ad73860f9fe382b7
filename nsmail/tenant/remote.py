"""Remote delivery: from a recipient domain to its mail hosts, to a session, to one outcome
per recipient. The scheduler (nsmail.core.scheduler) decides when and over which session;
this module does what it decides.

`route` looks up the domain's MX (RFC 5321 5.1, RFC 7505 null MX) and what each mail host
demands of TLS (`nsmail.tenant.policies`: the operator's `verify`, else DANE where the
host has validated TLSA records, else the domain's MTA-STS policy, else opportunistic),
and names the destination: the set of mail hosts, with the TLS policies and address
family when they narrow it, so that domains served by the same hosts share sessions and
one concurrency window, and a session opened for less is never used for more.

`open` tries at most `mx_address_limit` addresses in preference order, the tenant's other
address family right after a failure of one (a receiver refusing an IPv6 client without
PTR takes the same mail over IPv4), and with opportunistic TLS retries an address in the
clear at once when its handshake fails, as Postfix's `may` does (and remembers the
address for a while: no handshake to wait out for every message). A policy that demands
TLS (`verify`, DANE, MTA-STS in enforce mode) never falls back, and a host it does not
allow (not in the MTA-STS policy, its TLSA lookup failed) is not connected to; MTA-STS in
testing mode falls back to opportunistic TLS. Each outcome says which policy applied
(`Outcome.tls`), and `tls_failures` counts the sessions each policy failed. `send` runs
one transaction and says what it came to for the destination
(nsmail.core.scheduler.Result).

Security: runs as the tenant inside its namespace and chroot. Envelope addresses come from
tenant-written queue files and replies from remote servers; neither is trusted: addresses
are checked before they reach an SMTP command (by the protocol core), and every text from
either is escaped where it reaches a log line.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from nsmail.core import tlsrpt
from nsmail.core.config import DeliveryConfig, DestinationRule, SmtpTimeouts, Tenant
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status
from nsmail.core.routing import NullMX, route
from nsmail.core.scheduler import Policy, Result
from nsmail.core.smtp import Delivered, Failure, Kind, Stage, TlsMode
from nsmail.core.smtp.reply import tls_failed
from nsmail.core.tlspolicy import DEMANDING, TlsPolicy
from nsmail.tenant.policies import MAY, Demand, Policies
from nsmail.tenant.resolver import Resolver, validated
from nsmail.tenant.smtp import (
    Dane,
    Session,
    SessionError,
    Timeouts,
    TlsContexts,
    open_session,
)
from nsmail.tenant.tlsreports import TlsReports, result_of

Address = IPv4Address | IPv6Address

# RFC 5321 4.1.2: no control characters, spaces or angle brackets inside a path.
_BAD_PATH_CHARS = re.compile(r"[\x00-\x20\x7f<>]")
# The stages of one transaction: a 5yz there is about this mail, not the session.
_TRANSACTION = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.MESSAGE, Stage.DOT})
TLS_BROKEN_FOR = 3600.0  # seconds an address whose handshake failed is spoken to in clear


class Unroutable(Exception):
    """The domain has no mail host to try now: `status` says whether ever."""

    def __init__(self, status: Status, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class Unreached(Exception):
    """No session could be opened: `failure` is the last one met (None: no address)."""

    def __init__(
        self, text: str, relay: str, failure: Failure | None, throttled: bool, tls: str = ""
    ) -> None:
        super().__init__(text)
        self.text = text
        self.relay = relay
        self.failure = failure
        self.throttled = throttled  # every server that answered asked to slow down
        self.tls = tls  # the TLS policy of the last try (see Opened.tls)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a domain's mail goes, and how."""

    domain: str
    hosts: tuple[str, ...]  # mail hosts in the order to try
    implicit: bool  # no MX: the domain is its own mail host
    demands: tuple[Demand, ...]  # what each host demands of TLS, in the order of `hosts`
    family: str  # "any", "ipv4" or "ipv6"

    @property
    def destination(self) -> str:
        """The scheduler's name for it: the hosts, and the TLS policies and family when
        they narrow what a session to those hosts may carry. A host the policy forbids
        is marked "!": a domain whose policy forbids it never shares the session of one
        whose policy allows it."""
        forbidden = {
            host
            for host, demand in zip(self.hosts, self.demands, strict=True)
            if demand.problem is not None and demand.policy is not TlsPolicy.MTA_STS_TESTING
        }
        name = ",".join(sorted(f"!{h}" if h in forbidden else h for h in self.hosts))
        policies = sorted({d.policy for d in self.demands} - {TlsPolicy.MAY})
        if policies:
            name += "/" + "+".join(policies)
        return name if self.family == "any" else f"{name}/{self.family}"


@dataclass(slots=True)
class Opened:
    """A session ready for transactions, and where it goes."""

    session: Session
    relay: str  # host[address]:port
    seconds: float  # how long opening it took (connection, greeting, EHLO, TLS)
    # The log's tls=: the policy it met (verified, dane, mta-sts), else what it is (may,
    # none: opportunistic, or MTA-STS in testing mode that fell back).
    tls: str = TlsPolicy.MAY


@dataclass(frozen=True, slots=True)
class Sent:
    """One transaction's outcomes, and what it came to for the destination."""

    outcomes: tuple[Outcome, ...]
    result: Result
    # Refused for the client's address family: worth a try over the tenant's other one.
    other_family: tuple[str, ...] = ()


@dataclass
class Remote:
    """Opens sessions and sends for one tenant; shared by all its destinations."""

    tenant: Tenant
    config: DeliveryConfig
    resolver: Resolver
    contexts: TlsContexts
    rng: random.Random
    clock: Callable[[], float] = time.monotonic
    policy_cache: Path | None = None  # the tenant's MTA-STS policies on disk
    # Sessions each policy failed to have as it demands (TLS, or a host it does not allow).
    tls_failures: Counter[str] = field(default_factory=Counter)
    # Told of each session under a receiver's policy, for TLS reports (RFC 8460); None: off.
    reports: TlsReports | None = None
    _tls_broken: dict[Address, float] = field(default_factory=dict)
    policies: Policies = field(init=False)

    def __post_init__(self) -> None:
        self.policies = Policies(
            self.resolver,
            self.contexts.verifying,
            self._reachable,
            self._source,
            self.policy_cache,
        )

    @property
    def timeouts(self) -> Timeouts:
        return smtp_timeouts(self.config.smtp_timeouts)

    def policy(self, route: Route) -> Policy:
        """The scheduler's policy for a route's destination: the tenant's concurrency,
        narrowed by the first [[delivery.destination]] rule that matches."""
        concurrency = self.tenant.concurrency_in(self.config)
        initial = concurrency.initial_destination_concurrency
        limit = concurrency.destination_concurrency_limit
        rule = self._rule(route.domain, route.hosts)
        if rule is not None:
            limit = rule.destination_concurrency_limit or limit
            initial = min(rule.initial_destination_concurrency or initial, limit)
        # A dead destination is probed on the queue's own backoff (Postfix marks a dead
        # site for minimal_backoff_time), and no pause for "slow down" outlasts it.
        config, defaults = self.config, Policy()
        return Policy(
            initial_concurrency=initial,
            concurrency_limit=limit,
            dead_after=config.dead_after,
            probe_first=config.retry_first,
            probe_max=config.retry_max,
            throttle_first=min(defaults.throttle_first, config.retry_first),
            throttle_max=min(defaults.throttle_max, config.retry_max),
        )

    def _rule(self, domain: str, hosts: Sequence[str]) -> DestinationRule | None:
        names = (domain, *hosts)
        return next((r for r in self.config.destinations if r.matches(names)), None)

    # -- routing ------------------------------------------------------------------------

    async def route(self, domain: str, family: str | None = None) -> Route:
        """The route to `domain` (lower case); raises `Unroutable`."""
        try:
            name = dns.name.from_text(domain, dns.name.root)
        except dns.exception.DNSException as e:
            raise Unroutable(Status.PERMANENT, f"5.1.2 bad domain {domain}: {e}") from None
        try:
            answer = await self.resolver.lookup(name, dns.rdatatype.MX)
            mx = [(r.preference, r.exchange.to_text()) for r in answer]
            mx_validated = validated(answer)
        except dns.resolver.NoAnswer:
            mx, mx_validated = None, False
        except dns.resolver.NXDOMAIN:
            raise Unroutable(Status.PERMANENT, f"5.1.2 domain {domain} does not exist") from None
        except dns.exception.DNSException as e:
            raise Unroutable(Status.TEMPORARY, f"4.4.3 MX lookup of {domain} failed: {e}") from None
        targets = route(domain, mx, self.rng)
        if isinstance(targets, NullMX):
            raise Unroutable(Status.PERMANENT, f"5.1.10 domain {domain} accepts no mail (null MX)")
        rule = self._rule(domain, targets.hosts)
        chosen = family or (rule.family if rule is not None and rule.family else "any")
        demands = await self._demands(domain, targets.hosts, mx_validated)
        return Route(domain, targets.hosts, targets.implicit, demands, chosen)

    async def _demands(
        self, domain: str, hosts: tuple[str, ...], mx_validated: bool
    ) -> tuple[Demand, ...]:
        policy = self.tenant.tls or self.config.tls
        if policy == "verify" or domain in self.config.tls_verify:
            described = tlsrpt.Policy(domain, "no-policy-found")  # the operator's, not theirs
            return tuple(Demand(TlsPolicy.VERIFIED, report=described) for _ in hosts)
        return await self.policies.demands(
            domain, hosts, mx_validated=mx_validated, port=self.config.port
        )

    # -- sessions -----------------------------------------------------------------------

    async def open(self, route: Route) -> Opened:
        """A session to one of the route's addresses; raises `Unreached` or `Unroutable`."""
        started = self.clock()
        last: Failure | None = None
        relay = ""
        tried = 0
        found = temporary_lookup = False
        throttled: bool | None = None  # whether every server that answered said slow down
        label = ""
        for host, demand in zip(route.hosts, route.demands, strict=True):
            label = str(demand.policy)
            if demand.problem is not None:
                # A host the policy does not allow: never connected to, unless the policy
                # is only being tested (RFC 8461 5: then delivered as without it).
                forbidden = tls_failed(Stage.TLS, demand.problem)
                self.tls_failures[demand.policy] += 1
                self._report(demand, host, None, forbidden)
                if demand.policy is not TlsPolicy.MTA_STS_TESTING:
                    found, relay, last = True, host, forbidden
                    continue
                demand = MAY
            addresses, lookup_failed = await self._addresses(host, route.family)
            temporary_lookup = temporary_lookup or lookup_failed
            for address in addresses:
                if tried >= self.config.mx_address_limit:
                    break
                found = True
                tried += 1
                relay = f"{host}[{address}]:{self.config.port}"
                try:
                    session, label = await self._open_one(host, address, demand, route.domain)
                except SessionError as e:
                    last = e.failure
                    if last.kind is Kind.TLS and demand.policy in DEMANDING:
                        self.tls_failures[demand.policy] += 1
                        self._report(demand, host, address, last)
                    if last.kind is Kind.REPLY:
                        throttled = throttled is not False and last.slow_down
                    continue
                if demand.policy is not TlsPolicy.MTA_STS_TESTING or label == TlsPolicy.MTA_STS:
                    self._report(demand, host, address, None)  # (a fallback is a failure)
                return Opened(session, relay, self.clock() - started, label)
        if not found:
            if route.implicit and not temporary_lookup:
                # RFC 5321 5.1: neither MX nor address records: the domain takes no mail.
                text = f"5.1.2 domain {route.domain} has no mail host"
                raise Unroutable(Status.PERMANENT, text)
            text = f"4.4.4 no address found for the mail hosts of {route.domain}"
            raise Unreached(text, "", None, throttled=False)
        assert last is not None
        raise Unreached(failure_text(last, relay), relay, last, throttled is True, label)

    async def _open_one(
        self, host: str, address: Address, demand: Demand, domain: str
    ) -> tuple[Session, str]:
        """A session to `address` as `demand` wants it, and its label (`Opened.tls`)."""
        policy = demand.policy
        if policy is TlsPolicy.DANE:
            # RFC 7672 3.2.3: a DANE-TA chain names the MX host or the recipient domain.
            dane = Dane(demand.tlsa, (host, domain))
            return await self._connect(host, address, TlsMode.VERIFY, dane), policy
        if policy is TlsPolicy.MTA_STS_TESTING:
            try:
                return await self._connect(host, address, TlsMode.VERIFY), TlsPolicy.MTA_STS
            except SessionError as e:
                if e.failure.kind is not Kind.TLS:
                    raise
                self.tls_failures[policy] += 1  # RFC 8461 5: reported, delivered as before
                self._report(demand, host, address, e.failure)
        elif policy is not TlsPolicy.MAY:
            return await self._connect(host, address, TlsMode.VERIFY), policy
        session = await self._opportunistic(host, address)
        return session, session.tls

    async def _opportunistic(self, host: str, address: Address) -> Session:
        tls = TlsMode.MAY
        if self._tls_broken.get(address, 0.0) > self.clock():
            tls = TlsMode.NONE
        try:
            return await self._connect(host, address, tls)
        except SessionError as e:
            failure = e.failure
            if not (tls is TlsMode.MAY and failure.kind is Kind.TLS and failure.stage is Stage.TLS):
                raise
        # RFC 7435 opportunistic: a handshake that fails is no reason to keep the mail
        # back; the next session in clear carries it, and a few more hold off the retry.
        self._tls_broken[address] = self.clock() + TLS_BROKEN_FOR
        return await self._connect(host, address, TlsMode.NONE)

    async def _connect(
        self, host: str, address: Address, tls: TlsMode, dane: Dane | None = None
    ) -> Session:
        return await open_session(
            address,
            self.config.port,
            source=self._source(address),
            ehlo=self.tenant.ehlo,
            tls=tls,
            contexts=self.contexts,
            timeouts=self.timeouts,
            server_name=host,
            dane=dane,
        )

    def _report(
        self, demand: Demand, host: str, address: Address | None, failure: Failure | None
    ) -> None:
        """Tell the TLS reports of one session under a receiver's policy."""
        if self.reports is None or demand.report is None:
            return
        detail = None
        if failure is not None:
            source = self._source(address) if address is not None else None
            sending = source or self.tenant.ipv6 or self.tenant.ipv4
            detail = tlsrpt.Detail(result_of(failure), str(sending or ""), host, str(address or ""))
        self.reports.record(demand.report, detail)

    def _source(self, address: Address) -> Address | None:
        """The tenant's address of the family of `address` (None: the host's own mail)."""
        return self.tenant.ipv6 if address.version == 6 else self.tenant.ipv4

    async def _reachable(self, host: str) -> list[Address]:
        addresses, _ = await self._addresses(host, "any")
        return addresses

    async def _addresses(self, host: str, family: str) -> tuple[list[Address], bool]:
        """Addresses of `host` the tenant can reach in `family`, IPv6 first; and whether a
        lookup failed for now (so "no address" may not be final)."""
        tenant = self.tenant
        unbound = not tenant.addresses  # the host's own mail: the kernel chooses
        wanted = [
            (dns.rdatatype.AAAA, tenant.ipv6 is not None or unbound, "ipv6"),
            (dns.rdatatype.A, tenant.ipv4 is not None or unbound, "ipv4"),
        ]
        found: list[Address] = []
        temporary = False
        for rdtype, reachable, name in wanted:
            if not reachable or family not in ("any", name):
                continue
            try:
                answer = await self.resolver.lookup(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                temporary = True
                continue
            found.extend(ip_address(r.address) for r in answer)
        return _alternate(found), temporary

    # -- transactions -------------------------------------------------------------------

    async def send(
        self,
        opened: Opened,
        sender: str,
        recipients: Sequence[str],
        message: Message,
        *,
        kept: bool,
    ) -> Sent:
        """One transaction on `opened` (`kept`: a session that carried mail before)."""
        session = opened.session
        results = await session.deliver(sender, recipients, message)
        outcomes = tuple(_outcome(r, results[r], opened.relay, opened.tls) for r in recipients)
        failures = [f for f in results.values() if isinstance(f, Failure)]
        delivered = len(failures) < len(results)
        other = self._other_family(session, results)
        if kept and not delivered and failures and _stale(failures):
            result = Result.STALE  # a kept session the server had closed: no one's fault
        elif not delivered and any(f.slow_down for f in failures):
            result = Result.THROTTLED
        elif not delivered and any(f.connection_level for f in failures):
            result = Result.UNREACHABLE
        else:
            result = Result.DELIVERED
        return Sent(outcomes, result, other)

    def _other_family(
        self, session: Session, results: dict[str, Delivered | Failure]
    ) -> tuple[str, ...]:
        """Recipients refused for the session's address family when the tenant has the
        other one."""
        other = self.tenant.ipv4 if session.peer[0].version == 6 else self.tenant.ipv6
        if other is None:
            return ()
        return tuple(
            r for r, f in results.items() if isinstance(f, Failure) and f.other_family_may_help
        )


def _stale(failures: Sequence[Failure]) -> bool:
    """Whether a kept session failed at its first command because the server had closed
    it while it was idle (servers may: RFC 5321 4.5.3.2.7)."""
    return all(
        f.kind in (Kind.DROPPED, Kind.REPLY)
        and f.stage in (Stage.MAIL, Stage.IDLE)
        and (f.kind is Kind.DROPPED or (f.reply is not None and f.reply.code == 421))
        for f in failures
    )


def _alternate(addresses: list[Address]) -> list[Address]:
    """IPv6 and IPv4 addresses in turn, IPv6 first: after a failure over one family, the
    other is tried next (RFC 8305's spirit, one at a time)."""
    six = [a for a in addresses if a.version == 6]
    four = [a for a in addresses if a.version == 4]
    mixed: list[Address] = []
    for pair in zip(six, four, strict=False):
        mixed.extend(pair)
    longer = six if len(six) > len(four) else four
    return mixed + longer[min(len(six), len(four)) :]


def _outcome(recipient: str, result: Delivered | Failure, relay: str, tls: str) -> Outcome:
    if isinstance(result, Delivered):
        reply = result.reply
        return Outcome(recipient, Status.DELIVERED, reply.code, reply.text, relay, tls)
    # A 5yz in the transaction is about this mail; one before it (greeting, EHLO) is about
    # the session, and another host or a later try may do better.
    final = result.permanent and (result.stage in _TRANSACTION or result.kind is Kind.UNSENDABLE)
    status = Status.PERMANENT if final else Status.TEMPORARY
    code = result.reply.code if result.reply is not None else None
    return Outcome(recipient, status, code, failure_text(result, relay), relay, tls)


def failure_text(failure: Failure, relay: str) -> str:
    """An outcome's text for `failure` at `relay`: the reply and what it answered, or the
    status code, where and what happened, in words (as Postfix's "connect to host[ip]")."""
    if failure.reply is not None:
        return f"{failure.reply.text} ({failure.stage.context})"
    return f"{failure.enhanced} {relay}: {failure.words}"


def bad_address(address: str) -> bool:
    """Whether `address` cannot be put in an SMTP path (RFC 5321 4.1.2)."""
    return bool(_BAD_PATH_CHARS.search(address))


def smtp_timeouts(configured: SmtpTimeouts) -> Timeouts:
    return Timeouts(
        connect=configured.connect,
        greeting=configured.helo,
        command=configured.helo,
        mail=configured.mail,
        rcpt=configured.rcpt,
        data=configured.data_init,
        block=configured.data_xfer,
        dot=configured.data_done,
        tls=configured.starttls,
    )
