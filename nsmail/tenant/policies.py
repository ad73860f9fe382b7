"""The receivers' TLS policies, looked up by the worker: DANE's TLSA records and MTA-STS
policies, and what each demands of a session to a mail host (`Demand`).

DANE (RFC 7672): for a domain whose MX answer was DNSSEC-validated, each MX host's TLSA
records at `_25._tcp.<host>`, believed only when their answer was validated too (the AD
bit, which the relay passes on only from a validating resolver it trusts). A validated
answer with records demands DANE; one without records, or an unvalidated one, demands
nothing; a lookup that fails (a validating resolver answers SERVFAIL for bogus data) keeps
the host from being used at all (RFC 7672 2.2: no downgrade on failure).

MTA-STS (RFC 8461): the `_mta-sts.<domain>` TXT record, and the policy fetched over HTTPS
from `mta-sts.<domain>` from the tenant's own address, the certificate checked with the
CA store loaded before the chroot (no getaddrinfo: the address comes from the worker's
resolver). A policy is kept in memory and in the tenant's spool (`mta-sts/`) for its
`max_age`, so that a worker started afresh applies it as well, refetched when the record's
id changes or half its max_age has gone, and kept when a refetch fails
(nsmail.core.mtasts.plan). DANE takes precedence over MTA-STS for a host with TLSA
records (RFC 8461 2).

Security: runs as the tenant inside its namespace and chroot. DNS answers, policy files
and the cache (the tenant can write its spool) are hostile and parsed by the pure cores,
with bounds; a cache file that does not parse counts as none.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from nsmail.core import dane, mtasts, tlsrpt
from nsmail.core.mtasts import Cached, FetchError, Mode, Policy, Step
from nsmail.core.tlspolicy import TlsPolicy
from nsmail.tenant import statefile
from nsmail.tenant.resolver import Resolver, texts, validated
from nsmail.tenant.smtp import SessionError, connect

log = logging.getLogger("nsmail.tenant.policies")

Address = IPv4Address | IPv6Address
HTTPS_PORT = 443
FETCH_TIMEOUT = 30.0  # seconds for one policy fetch, connection to last byte
CACHE_DIR = "mta-sts"  # in the tenant's spool
_READ = mtasts.MAX_POLICY + 16 * 1024  # the body's bound, and room for the header
# A cache file is named by its domain: LDH labels only (the domain comes from an address).
_FILE_NAME = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)+")


@dataclass(frozen=True, slots=True)
class Demand:
    """What a session to one mail host must be."""

    policy: TlsPolicy
    tlsa: tuple[dane.Tlsa, ...] = ()  # DANE: the usable records (none: encrypted, no check)
    # Why the host cannot be used as the policy wants (not allowed by the MTA-STS policy,
    # its TLSA lookup failed): enforced, no connection; in testing mode, only reported.
    problem: str | None = None
    report: tlsrpt.Policy | None = None  # the policy as a TLS report names it (RFC 8460)


MAY = Demand(TlsPolicy.MAY)


@dataclass
class Policies:
    """One tenant's view of its receivers' TLS policies."""

    resolver: Resolver
    contexts_verifying: ssl.SSLContext
    addresses: Callable[[str], Awaitable[list[Address]]]  # a host's, reachable by the tenant
    source: Callable[[Address], Address | None]  # the tenant's address to connect from
    cache_dir: Path | None  # where policies are kept between workers; None: memory only
    clock: Callable[[], float] = time.time
    fetch_timeout: float = FETCH_TIMEOUT
    https_port: int = HTTPS_PORT  # RFC 8461 3.3 names none but HTTPS's; tests move it
    _cached: dict[str, Cached | None] = field(default_factory=dict)
    _fetching: dict[str, asyncio.Task[Cached | None]] = field(default_factory=dict)

    async def demands(
        self, domain: str, hosts: Sequence[str], *, mx_validated: bool, port: int
    ) -> tuple[Demand, ...]:
        """What each of `domain`'s mail hosts demands: DANE where it has TLSA records and
        the MX answer was validated (RFC 7672 2.2.1), else the domain's MTA-STS policy."""
        policy = await self.mta_sts(domain)
        found = []
        for host in hosts:
            by_dane = await self.dane(domain, host, port) if mx_validated else None
            found.append(by_dane or _by_mta_sts(domain, policy, host))
        return tuple(found)

    # -- DANE -----------------------------------------------------------------------------

    async def dane(self, domain: str, host: str, port: int) -> Demand | None:
        """What the host's TLSA records demand (the MX answer being validated), or None
        when DANE does not apply to it."""
        name = dane.base_name(host, port)
        try:
            answer = await self.resolver.lookup(name, dns.rdatatype.TLSA)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None  # RFC 7672 2.2: no TLSA records, no DANE
        except dns.exception.DNSException as e:
            why = f"the TLSA lookup of {name} failed ({e}): DANE cannot be checked"
            return Demand(TlsPolicy.DANE, problem=why, report=tlsrpt.Policy(domain, "tlsa"))
        if not validated(answer):
            return None  # an unvalidated answer is as good as none (RFC 7672 2.1)
        tlsa = [r for r in answer if r.rdtype == dns.rdatatype.TLSA]
        records = tuple(dane.Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in tlsa)
        described = tlsrpt.Policy(domain, "tlsa", tuple(r.to_text() for r in tlsa))
        return Demand(TlsPolicy.DANE, dane.usable(records), report=described)

    # -- MTA-STS --------------------------------------------------------------------------

    async def mta_sts(self, domain: str) -> Policy | None:
        """The MTA-STS policy in force for `domain` (testing or enforce), or None."""
        record = await self._record(domain)
        cached = self._load(domain)
        now = self.clock()
        step = mtasts.plan(cached, record, now)
        if step is Step.NONE:
            return None
        if step is Step.FETCH and record is not None:
            fetched = await self._fetch_once(domain, record.id)
            if fetched is not None:
                cached = fetched
            elif cached is None or cached.expired(now):
                return None  # RFC 8461 5: no policy to be had, none cached: as before
        if cached is None or cached.policy.mode is Mode.NONE:
            return None
        return cached.policy

    async def _record(self, domain: str) -> mtasts.Record | None:
        # None when there is none, or it is not known now: a cached policy still applies.
        return mtasts.parse_record(await texts(self.resolver, f"_mta-sts.{domain}"))

    async def _fetch_once(self, domain: str, record_id: str) -> Cached | None:
        """One fetch per domain at a time, however many messages wait for it."""
        task = self._fetching.get(domain)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(domain, record_id))
            self._fetching[domain] = task
            task.add_done_callback(lambda _: self._fetching.pop(domain, None))
        return await asyncio.shield(task)

    async def _fetch(self, domain: str, record_id: str) -> Cached | None:
        try:
            async with asyncio.timeout(self.fetch_timeout):
                text = await self._get(domain)
        except TimeoutError:
            why = f"timed out after {self.fetch_timeout:g} s"
        except (FetchError, OSError, dns.exception.DNSException) as e:
            why = str(e) or type(e).__name__
        else:
            policy = mtasts.parse_policy(text)
            if policy is not None:
                fetched = Cached(policy, record_id, self.clock())
                self._store(domain, fetched)
                return fetched
            why = "the policy is not a valid MTA-STS policy"
        log.warning("MTA-STS policy of %s not fetched: %s", domain, why)
        return None

    async def _get(self, domain: str) -> str:
        """The policy file of `domain` over HTTPS (RFC 8461 3.3), from the tenant's address."""
        host = f"mta-sts.{domain}"
        addresses = await self.addresses(host)
        if not addresses:
            raise FetchError(f"{host} has no address")
        last = FetchError(f"{host} could not be reached")
        for address in addresses:
            try:
                sock = await connect(
                    address, self.https_port, self.source(address), self.fetch_timeout
                )
            except SessionError as e:  # this address, then the next
                last = FetchError(f"{host}[{address}]: {e.failure.words}")
                continue
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=self.contexts_verifying, server_hostname=host
            )
            try:
                writer.write(mtasts.request(domain))
                data = await reader.read(_READ)
                while len(data) < _READ and (more := await reader.read(_READ - len(data))):
                    data += more
            finally:
                writer.transport.abort()
            return mtasts.parse_response(data)
        raise FetchError(str(last))

    # -- the cache ------------------------------------------------------------------------

    def _path(self, domain: str) -> Path | None:
        if self.cache_dir is None or not _FILE_NAME.fullmatch(domain):
            return None
        return self.cache_dir / domain

    def _load(self, domain: str) -> Cached | None:
        if domain in self._cached:
            return self._cached[domain]
        path = self._path(domain)
        data = None if path is None else statefile.read(path, _READ)
        found = None if data is None else mtasts.load(data)
        self._cached[domain] = found
        return found

    def _store(self, domain: str, cached: Cached) -> None:
        self._cached[domain] = cached
        path = self._path(domain)
        if path is None:
            return
        try:
            statefile.replace(path, mtasts.dump(cached))
        except OSError as e:  # a full disk: the policy still applies from memory
            log.warning("MTA-STS policy of %s not cached on disk: %s", domain, e)


def _by_mta_sts(domain: str, policy: Policy | None, host: str) -> Demand:
    """What `domain`'s MTA-STS `policy` demands of `host` (RFC 8461 4.1, 5)."""
    if policy is None:
        return Demand(TlsPolicy.MAY, report=tlsrpt.Policy(domain, "no-policy-found"))
    problem = None if policy.allows(host) else f"{host} is not an MX host of its MTA-STS policy"
    testing = policy.mode is Mode.TESTING
    described = tlsrpt.Policy(domain, "sts", tuple(policy.text().splitlines()), policy.mx)
    kind = TlsPolicy.MTA_STS_TESTING if testing else TlsPolicy.MTA_STS
    return Demand(kind, problem=problem, report=described)
