"""DNS preflight (`nsmail check --dns`): would large receivers accept each tenant's identity?

The rules (PTR, forward-confirmed reverse DNS, SPF, MX, DKIM; each problem with the
record to publish) are `nsmail.core.preflight`'s: DNS answers in, `Finding`s out. This
is the IO shell: it forks one child per tenant that asks DNS the way the tenant's worker
does: a worker resolves through the DNS relay, which asks the `[host] resolvers` from the
host's network namespace as `[host] user`, so the child asks the same resolvers from
where the command runs (the host's namespace), as the same user, with dnspython (and
pyspf for SPF). It never asks from the tenant's namespace: that has no route to a
resolver of a family the tenant lacks, nor to a loopback one, which the relay reaches all
the same. The findings come back as JSON over a pipe.

Security: run by root. Each child drops to `[host] user` with no capabilities before
sending a query, so DNS answers (written by whoever controls the tenant's zones) are
parsed unprivileged. The parent only decodes the child's JSON into fixed-shape findings.
DNS text reaches the terminal with unprintable characters escaped.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NoReturn

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.resolver
import spf

from nsmail.core.config import Config, IPAddress, Tenant
from nsmail.core.exitcodes import EX_OK, EX_PROBLEMS, EX_USAGE
from nsmail.core.preflight import (
    SPF_TEMPERROR,
    AddressFacts,
    Answer,
    DkimKey,
    Finding,
    SpfVerdict,
    TenantFacts,
    dkim_name,
    evaluate,
)
from nsmail.core.text import printable
from nsmail.root import jail

LOOKUP_TIMEOUT = 5.0  # one lookup, all resolvers included
SPF_TIME = 20.0  # one SPF evaluation, every lookup included (RFC 7208 4.6.4)
TENANT_TIMEOUT = 120.0  # one tenant's child, all of its lookups included
MAX_CHILDREN = 8
MAX_REPLY = 1 << 20


def render(findings: Sequence[Finding]) -> str:
    """The text report: one line per problem, or "all clear"; then one per advice."""
    problems = [f.line() for f in findings if not f.ok] or ["all clear"]
    return "\n".join(problems + [f.line() for f in findings if f.advice])


def exit_code(findings: Iterable[Finding]) -> int:
    """0 all clear; 1 when a receiver would object, or a check could not be made."""
    return EX_OK if all(f.ok for f in findings) else EX_PROBLEMS


# --- the IO shell --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One tenant's check: whom to ask, as whom."""

    tenant: Tenant
    resolvers: tuple[IPAddress, ...]  # `[host] resolvers`, as the DNS relay asks them
    uid: int  # whom the child becomes before it asks: `[host] user`, as the relay runs
    gid: int
    dkim: tuple[DkimKey, ...] = ()


def main(
    config: Config,
    domains: Sequence[str],
    as_json: bool,
    dkim: Mapping[str, Sequence[DkimKey]] | None = None,
) -> int:
    """`nsmail check --dns [TENANT...] [--json]`: 0 all clear, 1 problems, 64 unknown tenant."""
    unknown = sorted(set(domains) - {t.domain for t in config.tenants})
    if unknown:
        print(f"nsmail: no such tenant: {', '.join(unknown)}", file=sys.stderr)
        return EX_USAGE
    findings = run(config, domains, dkim or {})
    print(json.dumps([asdict(f) for f in findings]) if as_json else render(findings))
    return exit_code(findings)


def run(
    config: Config, domains: Sequence[str], dkim: Mapping[str, Sequence[DkimKey]]
) -> list[Finding]:
    """Check the named tenants (all if none), up to MAX_CHILDREN at a time, in config order."""
    tenants = [t for t in config.tenants if not domains or t.domain in domains]
    jobs = [_job(config, t, tuple(dkim.get(t.domain, ()))) for t in tenants]
    results: dict[int, tuple[Finding, ...]] = {}
    running: dict[int, tuple[int, int, float]] = {}  # pid -> (job index, read fd, deadline)
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < MAX_CHILDREN:
            index, job = pending.pop(0)
            pid, fd = _start(job)
            running[pid] = (index, fd, time.monotonic() + TENANT_TIMEOUT)
        pid = next(iter(running))
        index, fd, deadline = running.pop(pid)
        results[index] = _collect(jobs[index].tenant.domain, pid, fd, deadline)
    return [finding for i in range(len(jobs)) for finding in results[i]]


def _job(config: Config, tenant: Tenant, dkim: tuple[DkimKey, ...]) -> Job:
    host = config.host
    return Job(tenant, host.resolvers, host.uid, host.gid, dkim)


def _start(job: Job) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(job, write_fd)
    os.close(write_fd)
    return pid, read_fd


def _child(job: Job, write_fd: int) -> NoReturn:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        reply = json.dumps([asdict(f) for f in _check_here(job)])
        code = 0
    except BaseException as e:
        reply = json.dumps({"error": f"{type(e).__name__}: {e}"})
    finally:
        try:
            data = reply.encode()
            while data:
                data = data[os.write(write_fd, data) :]
        finally:
            os._exit(code)


def _check_here(job: Job) -> list[Finding]:
    if os.geteuid() == 0:
        jail.drop(job.uid, job.gid)
    resolver = _make_resolver(job.resolvers)
    # pyspf asks DNS through this module-level hook; the child is a process of its own.
    spf.DNSLookup = _spf_lookup(resolver)
    return evaluate(gather(job.tenant, resolver, job.dkim))


def _collect(domain: str, pid: int, fd: int, deadline: float) -> tuple[Finding, ...]:
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= MAX_REPLY:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                return (_broken(domain, f"no answer within {TENANT_TIMEOUT:.0f} s"),)
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return _decode(domain, b"".join(chunks))


def _decode(domain: str, data: bytes) -> tuple[Finding, ...]:
    """The child's findings; one "could not be checked" finding for anything else."""
    try:
        reply = json.loads(data)
    except ValueError:
        return (_broken(domain, "the checking process died"),)
    if isinstance(reply, dict):
        return (_broken(domain, str(reply.get("error"))),)
    findings = tuple(_finding(domain, item) for item in reply) if isinstance(reply, list) else ()
    if not findings or None in findings:
        return (_broken(domain, "the checking process sent nonsense"),)
    return tuple(f for f in findings if f is not None)


def _finding(domain: str, item: object) -> Finding | None:
    """The finding in one decoded JSON item if it is exactly one about `domain`."""
    if not isinstance(item, dict) or set(item) != {f.name for f in fields(Finding)}:
        return None
    texts = (item["check"], item["problem"], item["fix"])
    if (
        item["tenant"] != domain
        or item["family"] not in (None, "ipv4", "ipv6")
        or not isinstance(item["ok"], bool)
        or not all(t is None or isinstance(t, str) for t in texts)
        or not isinstance(item["check"], str)
    ):
        return None

    def text(key: str) -> str | None:
        value = item[key]
        return None if value is None else printable(value)

    return Finding(
        domain, item["family"], printable(item["check"]), item["ok"], text("problem"), text("fix")
    )


def _broken(domain: str, why: str) -> Finding:
    return Finding(domain, None, "lookup", False, f"could not be checked: {printable(why)}")


def _make_resolver(resolvers: Sequence[IPAddress]) -> dns.resolver.Resolver:
    """A resolver asking `resolvers`, reading no files, with absolute names only."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [str(r) for r in resolvers]
    resolver.timeout = LOOKUP_TIMEOUT / 2
    resolver.lifetime = LOOKUP_TIMEOUT
    resolver.domain = dns.name.root
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.cache = dns.resolver.Cache()  # pyspf and gather ask for the same TXT records
    return resolver


def gather(tenant: Tenant, resolver: dns.resolver.Resolver, dkim: Sequence[DkimKey]) -> TenantFacts:
    """Ask DNS everything `evaluate` needs about `tenant`."""
    identities = list(dict.fromkeys((tenant.domain, tenant.ehlo)))
    addresses = tuple(
        AddressFacts(
            address,
            ptr=_lookup(resolver, address.reverse_pointer, "PTR"),
            forward=_lookup(resolver, tenant.ehlo, "A" if address.version == 4 else "AAAA"),
            spf=tuple(_spf_verdict(address, tenant.domain, tenant.ehlo, i) for i in identities),
        )
        for address in tenant.addresses
    )
    return TenantFacts(
        tenant.domain,
        tenant.ehlo,
        addresses,
        mx=_lookup(resolver, tenant.domain, "MX"),
        spf_records={i: _spf_records(_lookup(resolver, i, "TXT")) for i in identities},
        dkim=tuple(
            (key, _lookup(resolver, dkim_name(tenant.domain, key.selector), "TXT")) for key in dkim
        ),
        dmarc=_lookup(resolver, f"_dmarc.{tenant.domain}", "TXT"),
        mta_sts=_lookup(resolver, f"_mta-sts.{tenant.domain}", "TXT"),
        tls_rpt=_lookup(resolver, f"_smtp._tls.{tenant.domain}", "TXT"),
    )


def _lookup(resolver: dns.resolver.Resolver, name: str, rtype: str) -> Answer:
    """The records of (name, rtype) as text; no records for NXDOMAIN and NODATA alike."""
    try:
        answer = resolver.resolve(
            dns.name.from_text(name), rtype, search=False, raise_on_no_answer=False
        )
    except dns.resolver.NXDOMAIN:
        return Answer()
    except dns.exception.DNSException as e:
        return Answer(error=printable(str(e)) or type(e).__name__)
    return Answer(tuple(printable(_rdata_text(r)) for r in answer.rrset or ()))


def _rdata_text(rdata: dns.rdata.Rdata) -> str:
    rtype = rdata.rdtype
    if rtype == dns.rdatatype.TXT:
        # RFC 7208 3.3 and RFC 6376 3.6.2.2: a record's strings are concatenated.
        return b"".join(rdata.strings).decode("utf-8", "backslashreplace")  # type: ignore[attr-defined]
    if rtype == dns.rdatatype.PTR:
        return str(rdata.target.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
    if rtype == dns.rdatatype.MX:
        exchange = rdata.exchange.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
        return f"{rdata.preference} {exchange}"  # type: ignore[attr-defined]
    return str(rdata.to_text())


def _spf_records(txt: Answer) -> Answer:
    # RFC 7208 4.5: an SPF record is a TXT record starting "v=spf1" then a space or nothing.
    found = (r for r in txt.records if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 "))
    return Answer(tuple(found), txt.error)


def _spf_verdict(address: IPAddress, domain: str, ehlo: str, identity: str) -> SpfVerdict:
    # RFC 7208 2.4: MAIL FROM postmaster@domain; 2.3: the HELO identity (no sender).
    sender = f"postmaster@{domain}" if identity == domain else ""
    query = spf.query(i=str(address), s=sender, h=ehlo, timeout=LOOKUP_TIMEOUT, querytime=SPF_TIME)
    try:
        result, _code, explanation = query.check()
    except Exception as e:  # pyspf raises on what it does not anticipate
        return SpfVerdict(identity, SPF_TEMPERROR, printable(str(e)))
    return SpfVerdict(identity, str(result), printable(str(explanation)))


SpfLookup = Callable[..., list[tuple[tuple[str, str], Any]]]


def _spf_lookup(resolver: dns.resolver.Resolver) -> SpfLookup:
    """pyspf's DNSLookup hook, answered by `resolver` (pyspf's own uses the deprecated
    `dns.resolver.query` and /etc/resolv.conf)."""

    def dns_lookup(
        name: str, qtype: str, strict: object = True, timeout: float = LOOKUP_TIMEOUT
    ) -> list[tuple[tuple[str, str], Any]]:
        try:
            answer = resolver.resolve(
                dns.name.from_text(name),
                qtype,
                search=False,
                raise_on_no_answer=False,
                lifetime=min(timeout, LOOKUP_TIMEOUT),
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as e:
            raise spf.TempError(f"DNS {e}") from e
        return [((name, qtype), _spf_value(qtype, r)) for r in answer.rrset or ()]

    return dns_lookup


def _spf_value(qtype: str, rdata: Any) -> Any:
    # The shapes pyspf's own dnspython lookup returns.
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange)
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return rdata.strings  # TXT
