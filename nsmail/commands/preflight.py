"""DNS preflight (`nsmail check --dns`): would large receivers accept each tenant's identity?

For every tenant and each of its address families it checks what receivers demand: the
address has a PTR naming the EHLO host, the EHLO host resolves back to the address
(forward-confirmed reverse DNS), SPF of the domain and of the EHLO host authorises the
address; for the domain, that it has an MX and that each DKIM selector's key in DNS is
the configured one. Every problem comes with the record to publish to fix it.

`evaluate` and `check_dkim` are the pure core: DNS answers in, `Finding`s out. The IO
shell forks one child per tenant that asks DNS the way the tenant's worker does: a worker
resolves through the DNS relay, which asks the `[host] resolvers` from the host's network
namespace as `[host] user`, so the child asks the same resolvers from where the command
runs (the host's namespace), as the same user, with dnspython (and pyspf for SPF). It
never asks from the tenant's namespace: that has no route to a resolver of a family the
tenant lacks, nor to a loopback one, which the relay reaches all the same. The findings
come back as JSON over a pipe.

Security: run by root. Each child drops to `[host] user` with no capabilities before
sending a query, so DNS answers (written by whoever controls the tenant's zones) are
parsed unprivileged. The parent only decodes the child's JSON into fixed-shape findings.
DNS text reaches the terminal with unprintable characters escaped.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from ipaddress import IPv4Address, IPv6Address
from typing import Any, NoReturn

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.resolver
import spf
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
    load_pem_public_key,
)

from nsmail.core.config import Config, IPAddress, Tenant
from nsmail.root import jail

EXIT_CLEAR = 0
EXIT_PROBLEMS = 1  # a receiver would object, or a check could not be made
EX_USAGE = 64  # an unknown tenant was named

LOOKUP_TIMEOUT = 5.0  # one lookup, all resolvers included
SPF_TIME = 20.0  # one SPF evaluation, every lookup included (RFC 7208 4.6.4)
TENANT_TIMEOUT = 120.0  # one tenant's child, all of its lookups included
MAX_CHILDREN = 8
MAX_REPLY = 1 << 20
TXT_STRING = 255  # RFC 1035 3.3.14: a TXT record is made of strings of at most 255 octets

# RFC 7208 2.6: the results of check_host().
SPF_PASS = "pass"
SPF_PERMERROR = "permerror"
SPF_TEMPERROR = "temperror"
SPF_NONE = "none"


# --- the pure core -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One lookup's outcome: the records as text, or why there is no knowing."""

    records: tuple[str, ...] = ()
    error: str | None = None  # the lookup failed (timeout, SERVFAIL): nothing is known


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """pyspf's check_host() of one address for one identity (RFC 7208 2.3, 2.4)."""

    identity: str  # the domain whose policy was evaluated: the tenant's or the EHLO name
    result: str  # RFC 7208 2.6: pass, fail, softfail, neutral, none, permerror, temperror
    explanation: str


@dataclass(frozen=True, slots=True)
class AddressFacts:
    address: IPAddress
    ptr: Answer  # PTR names of the address
    forward: Answer  # the EHLO name's A (IPv4) or AAAA (IPv6) records
    spf: tuple[SpfVerdict, ...]  # the domain's; then the EHLO name's, if it differs


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A configured DKIM signing key: its selector and public key (DER or PEM SPKI)."""

    selector: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class TenantFacts:
    """Everything DNS said about one tenant."""

    domain: str
    ehlo: str
    addresses: tuple[AddressFacts, ...]
    mx: Answer
    spf_records: Mapping[str, Answer]  # identity -> its v=spf1 TXT records
    dkim: tuple[tuple[DkimKey, Answer], ...] = ()  # each key with its selector's TXT


@dataclass(frozen=True, slots=True)
class Finding:
    """One check of one tenant (and address family): fine, or what is wrong and the fix."""

    tenant: str
    family: str | None  # "ipv4", "ipv6", or None for the domain as a whole
    check: str  # ptr, fcrdns, spf, spf-helo, mx, dkim, lookup
    ok: bool
    problem: str | None = None
    fix: str | None = None

    def line(self) -> str:
        fix = f": {self.fix}" if self.fix else ""
        return f"{self.tenant}: {self.problem}{fix}"


def evaluate(facts: TenantFacts) -> list[Finding]:
    """Every check of one tenant, in a stable order: per address, then the domain's."""
    findings: list[Finding] = []
    all_addresses = [a.address for a in facts.addresses]
    for address in facts.addresses:
        findings.append(_check_ptr(facts, address))
        findings.append(_check_forward(facts, address))
        findings += [_check_spf(facts, address, v, all_addresses) for v in address.spf]
    findings.append(_check_mx(facts))
    findings += [check_dkim(facts.domain, k.selector, k.public_key, a) for k, a in facts.dkim]
    return findings


def _family(address: IPAddress) -> str:
    return f"ipv{address.version}"


def _label(address: IPAddress) -> str:
    return f"IPv{address.version} {address}"


def _same_name(a: str, b: str) -> bool:
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def _lookup_failed(
    facts: TenantFacts, address: IPAddress | None, check: str, what: str, error: str
) -> Finding:
    return Finding(
        facts.domain,
        None if address is None else _family(address),
        check,
        ok=False,
        problem=f"the {what} lookup failed ({error})",
        fix="make sure the resolvers reach the zone's nameservers and those answer",
    )


def _check_ptr(facts: TenantFacts, found: AddressFacts) -> Finding:
    address, ehlo = found.address, facts.ehlo
    family = _family(address)
    reverse = f"{address.reverse_pointer}."
    wanted = f"{reverse} PTR {ehlo}."
    if found.ptr.error:
        return _lookup_failed(facts, address, "ptr", f"PTR {reverse}", found.ptr.error)
    if not found.ptr.records:
        return Finding(
            facts.domain, family, "ptr", False, f"{_label(address)} has no PTR", f"publish {wanted}"
        )
    if any(_same_name(name, ehlo) for name in found.ptr.records):
        return Finding(facts.domain, family, "ptr", ok=True)
    names = ", ".join(found.ptr.records)
    current = " and ".join(f"{reverse} PTR {name}." for name in found.ptr.records)
    return Finding(
        facts.domain,
        family,
        "ptr",
        ok=False,
        problem=f"{_label(address)} has PTR {names}, not the EHLO name {ehlo}",
        fix=f"replace {current} with {wanted}",
    )


def _check_forward(facts: TenantFacts, found: AddressFacts) -> Finding:
    address, ehlo = found.address, facts.ehlo
    family = _family(address)
    rtype = "A" if address.version == 4 else "AAAA"
    if found.forward.error:
        return _lookup_failed(facts, address, "fcrdns", f"{rtype} {ehlo}", found.forward.error)
    if any(_same_address(text, address) for text in found.forward.records):
        return Finding(facts.domain, family, "fcrdns", ok=True)
    have = (
        f"resolves to {', '.join(found.forward.records)}, not to {address}"
        if found.forward.records
        else f"has no {rtype} record"
    )
    return Finding(
        facts.domain,
        family,
        "fcrdns",
        ok=False,
        problem=f"EHLO name {ehlo} {have}, so {_label(address)} has no forward-confirmed "
        "reverse DNS",
        fix=f"{'add' if found.forward.records else 'publish'} {ehlo}. {rtype} {address}",
    )


def _same_address(text: str, address: IPAddress) -> bool:
    try:
        kind = IPv4Address if address.version == 4 else IPv6Address
        return kind(text) == address
    except ValueError:
        return False


def _check_spf(
    facts: TenantFacts, found: AddressFacts, verdict: SpfVerdict, everyone: list[IPAddress]
) -> Finding:
    identity = verdict.identity
    check = "spf" if identity == facts.domain else "spf-helo"
    family = _family(found.address)
    if verdict.result == SPF_PASS:
        return Finding(facts.domain, family, check, ok=True)
    who = identity if check == "spf" else f"the EHLO name {identity}"
    label = _label(found.address)
    records = facts.spf_records.get(identity, Answer())
    if verdict.result == SPF_TEMPERROR or records.error:
        why = records.error or verdict.explanation
        problem = f"SPF of {who} for {label} could not be evaluated ({why})"
        fix = f"make sure the nameservers of {identity} and of its include: targets answer"
    elif verdict.result == SPF_PERMERROR or len(records.records) > 1:
        problem = f"the SPF record of {who} is invalid ({verdict.explanation}), so {label} fails"
        fix = (
            f"publish exactly one valid SPF record, e.g. "
            f"{identity}. TXT {_txt(spf_record(None, everyone))}"
        )
    elif verdict.result == SPF_NONE or not records.records:
        problem = f"{label} is not authorised by SPF: {who} has no SPF record"
        fix = f"publish {identity}. TXT {_txt(spf_record(None, everyone))}"
    else:
        (current,) = records.records
        # Every address of the tenant this identity does not pass, so the fix shown on
        # each family's line is the same record.
        missing = [
            a.address
            for a in facts.addresses
            if any(v.identity == identity and v.result != SPF_PASS for v in a.spf)
        ]
        problem = f"{label} is not authorised by the SPF record of {who} ({verdict.result})"
        fix = f"replace {identity}. TXT {_txt(current)} with {_txt(spf_record(current, missing))}"
    return Finding(facts.domain, family, check, False, problem, fix)


def spf_record(current: str | None, addresses: Iterable[IPAddress]) -> str:
    """`current` (or a new strict record) with `addresses` authorised first.

    RFC 7208 4.6.2: mechanisms are evaluated left to right and the first match decides,
    so terms put right after the version authorise whatever follows them.
    """
    terms = [f"ip{a.version}:{a}" for a in addresses]
    if current is None:
        return " ".join(["v=spf1", *terms, "-all"])
    version, *rest = current.split()
    return " ".join([version, *terms, *rest])


def _check_mx(facts: TenantFacts) -> Finding:
    domain = facts.domain
    wanted = f"{domain}. MX 10 <the host that receives mail for {domain}>."
    if facts.mx.error:
        return _lookup_failed(facts, None, "mx", f"MX {domain}", facts.mx.error)
    exchanges = [record.split()[-1] for record in facts.mx.records]
    if exchanges and all(x == "." for x in exchanges):
        return Finding(
            domain,
            None,
            "mx",
            ok=False,
            problem="the domain has a null MX (RFC 7505): it accepts no mail, so replies bounce",
            fix=f"replace {domain}. MX 0 . with {wanted}",
        )
    if not exchanges:
        return Finding(
            domain,
            None,
            "mx",
            ok=False,
            problem="the domain has no MX record, so replies and bounces cannot come back",
            fix=f"publish {wanted}",
        )
    return Finding(domain, None, "mx", ok=True)


def dkim_name(domain: str, selector: str) -> str:
    """Where a selector's key record lives (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def check_dkim(domain: str, selector: str, public_key: bytes, txt: Answer) -> Finding:
    """Does the key record of `selector` publish `public_key`?

    `public_key` is a SubjectPublicKeyInfo, DER or PEM ("BEGIN PUBLIC KEY"), of an RSA or
    Ed25519 key; `txt` is the TXT lookup of `dkim_name(domain, selector)`. Raises
    ValueError if `public_key` is not such a key.
    """
    kind, spki, raw = _public_key(public_key)
    name = dkim_name(domain, selector)
    # RFC 8463 3: an Ed25519 p= is the bare key; RFC 6376 3.6.1 (erratum 3017) lets an
    # RSA p= be the SubjectPublicKeyInfo, which everyone publishes, or the RSAPublicKey.
    published = raw if kind == "ed25519" else spki
    wanted = f"{name}. TXT {_txt(f'v=DKIM1; k={kind}; p={base64.b64encode(published).decode()}')}"
    records = txt.records
    if txt.error:
        problem = f"the DKIM key lookup of selector {selector} ({name}) failed ({txt.error})"
        return Finding(domain, None, "dkim", False, problem, f"make sure {name} answers")
    if not records:
        problem = f"DKIM selector {selector} has no key record"
        return Finding(domain, None, "dkim", False, problem, f"publish {wanted}")
    if len(records) > 1:
        # RFC 6376 3.6.2.2: with several records for a selector the result is undefined.
        problem = f"DKIM selector {selector} has {len(records)} TXT records, verifiers pick any"
        return Finding(domain, None, "dkim", False, problem, f"keep only {wanted}")
    tags = _dkim_tags(records[0])
    if tags is None or tags.get("v", "DKIM1") != "DKIM1":
        problem = f"the DKIM key record of selector {selector} is malformed"
    elif not tags.get("p"):
        problem = f"the DKIM key of selector {selector} is revoked (empty p=)"
    elif tags.get("k", "rsa") == kind and _decode64(tags["p"]) in {published, raw}:
        return Finding(domain, None, "dkim", ok=True)
    else:
        problem = f"the DKIM key of selector {selector} is not the configured signing key"
    return Finding(domain, None, "dkim", False, problem, f"replace the record with {wanted}")


def _dkim_tags(record: str) -> dict[str, str] | None:
    """RFC 6376 3.2 tag=value list; None if malformed. Whitespace in values is folding."""
    tags: dict[str, str] = {}
    for spec in record.split(";"):
        if not spec.strip():
            continue
        name, equals, value = spec.partition("=")
        if not equals or name.strip() in tags:
            return None
        tags[name.strip()] = "".join(value.split())
    return tags


def _decode64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return None


def _public_key(data: bytes) -> tuple[str, bytes, bytes]:
    """(DKIM k= name, SubjectPublicKeyInfo DER, the bare key) of a DER or PEM public key."""
    load = load_pem_public_key if data.lstrip().startswith(b"-----BEGIN") else load_der_public_key
    try:
        key = load(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not a public key: {e}") from None
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519", spki, key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa", spki, key.public_bytes(Encoding.DER, PublicFormat.PKCS1)
    raise ValueError(f"a {type(key).__name__} is neither an RSA nor an Ed25519 key")


def _txt(value: str) -> str:
    """Zone-file text of a TXT record: quoted strings of at most 255 characters."""
    chunks = [value[i : i + TXT_STRING] for i in range(0, len(value), TXT_STRING)] or [""]
    quoted = ['"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks]
    return " ".join(quoted)


def render(findings: Sequence[Finding]) -> str:
    """The text report: one line per problem, or "all clear"."""
    return "\n".join([f.line() for f in findings if not f.ok] or ["all clear"])


def exit_code(findings: Iterable[Finding]) -> int:
    return EXIT_CLEAR if all(f.ok for f in findings) else EXIT_PROBLEMS


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
        return None if value is None else _printable(value)

    return Finding(
        domain, item["family"], _printable(item["check"]), item["ok"], text("problem"), text("fix")
    )


def _broken(domain: str, why: str) -> Finding:
    return Finding(domain, None, "lookup", False, f"could not be checked: {_printable(why)}")


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
        return Answer(error=_printable(str(e)) or type(e).__name__)
    return Answer(tuple(_printable(_rdata_text(r)) for r in answer.rrset or ()))


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
        return SpfVerdict(identity, SPF_TEMPERROR, _printable(str(e)))
    return SpfVerdict(identity, str(result), _printable(str(explanation)))


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


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
