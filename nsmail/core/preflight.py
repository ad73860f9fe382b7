"""DNS preflight's rules: would large receivers accept a tenant's identity, given DNS's answers?

For every tenant and each of its address families, what receivers demand: the address
has a PTR naming the EHLO host, the EHLO host resolves back to the address
(forward-confirmed reverse DNS), SPF of the domain and of the EHLO host authorises the
address; for the domain, that it has an MX, that each DKIM selector's key in DNS is the
configured one, and a DMARC record (RFC 7489), with which nsmail's mail aligns: its
envelope sender and its DKIM signature are both of the tenant's domain, as its From is.
Advice (a finding that is fine, with a fix) says what would make it better still:
signing with DKIM, so that DMARC holds for forwarded mail too; publishing an MTA-STS
policy (RFC 8461) and a TLS-RPT record (RFC 8460), as large receivers do. `evaluate` and
`check_dkim` take the answers (`TenantFacts`) and give `Finding`s, each problem with the
record to publish to fix it. Asking DNS is `nsmail.commands.preflight`'s (`nsmail check
--dns`).

Security: the answers are written by whoever controls the tenants' zones; they arrive as
text already escaped by the shell, and findings only quote them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
    load_pem_public_key,
)

from nsmail.core import mtasts, tlsrpt
from nsmail.core.addresses import same_domain
from nsmail.core.config import IPAddress

TXT_STRING = 255  # RFC 1035 3.3.14: a TXT record is made of strings of at most 255 octets

# RFC 7208 2.6: the results of check_host().
SPF_PASS = "pass"
SPF_PERMERROR = "permerror"
SPF_TEMPERROR = "temperror"
SPF_NONE = "none"


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
    # The TXT records of _dmarc, _mta-sts and _smtp._tls of the domain (None: not asked).
    dmarc: Answer | None = None
    mta_sts: Answer | None = None
    tls_rpt: Answer | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """One check of one tenant (and address family): fine, or what is wrong and the fix."""

    tenant: str
    family: str | None  # "ipv4", "ipv6", or None for the domain as a whole
    check: str  # ptr, fcrdns, spf, spf-helo, mx, dkim, dmarc, mta-sts, tls-rpt, lookup
    ok: bool
    problem: str | None = None  # for advice (ok, with a fix): what could be better
    fix: str | None = None

    @property
    def advice(self) -> bool:
        return self.ok and self.fix is not None

    def line(self) -> str:
        fix = f": {self.fix}" if self.fix else ""
        return f"{self.tenant}: {'advice: ' if self.advice else ''}{self.problem}{fix}"


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
    if facts.dmarc is not None:
        findings.append(_check_dmarc(facts, facts.dmarc))
    if facts.mta_sts is not None:
        findings.append(_check_mta_sts(facts.domain, facts.mta_sts))
    if facts.tls_rpt is not None:
        findings.append(_check_tls_rpt(facts.domain, facts.tls_rpt))
    return findings


def _check_dmarc(facts: TenantFacts, txt: Answer) -> Finding:
    """RFC 7489 6.3: one record, "v=DMARC1" first, a policy (p=) of none, quarantine or
    reject. nsmail's mail aligns by construction (6.2: the envelope sender's domain and
    the DKIM d= are the tenant's, as its From is); without DKIM only SPF carries it."""
    domain = facts.domain
    name = f"_dmarc.{domain}"
    wanted = f'{name}. TXT "v=DMARC1; p=none; rua=mailto:postmaster@{domain}"'
    if txt.error:
        return _lookup_failed(facts, None, "dmarc", f"TXT {name}", txt.error)
    records = [r for r in txt.records if r.startswith("v=DMARC1")]
    if not records:
        problem = f"{domain} has no DMARC record, which Gmail, Yahoo and Microsoft require"
        return Finding(domain, None, "dmarc", False, problem, f"publish {wanted}")
    if len(records) > 1:
        # RFC 7489 6.6.3: with more than one record, receivers apply none.
        problem = f"{domain} has {len(records)} DMARC records, so receivers apply none"
        return Finding(domain, None, "dmarc", False, problem, f"keep only one, e.g. {wanted}")
    tags = _dkim_tags(records[0])
    if tags is None or tags.get("v") != "DMARC1" or tags.get("p") not in _DMARC_POLICIES:
        problem = f"the DMARC record of {domain} is malformed (no valid p=)"
        return Finding(domain, None, "dmarc", False, problem, f"replace it with {wanted}")
    if not facts.dkim:
        problem = (
            f"DMARC of {domain} passes on SPF alone, which mail forwarded by a recipient fails"
        )
        fix = "sign with DKIM: give the tenant dkim_selector and dkim_key (nsmail keygen)"
        return Finding(domain, None, "dmarc", True, problem, fix)
    return Finding(domain, None, "dmarc", ok=True)


_DMARC_POLICIES = ("none", "quarantine", "reject")


def _check_mta_sts(domain: str, txt: Answer) -> Finding:
    """RFC 8461 3.1: a malformed record is a problem; none at all, advice."""
    name = f"_mta-sts.{domain}"
    if txt.error or mtasts.parse_record(txt.records) is not None:
        return Finding(domain, None, "mta-sts", ok=True)
    if any(r.startswith("v=STSv1") for r in txt.records):
        problem = f"the MTA-STS record {name} is not valid, so senders ignore the policy"
        return Finding(
            domain,
            None,
            "mta-sts",
            False,
            problem,
            f'publish one {name}. TXT "v=STSv1; id=<1-32 letters or digits>;"',
        )
    problem = f"{domain} publishes no MTA-STS policy: senders may deliver to it in clear"
    fix = (
        f'publish {name}. TXT "v=STSv1; id=1;" and https://mta-sts.{domain}'
        f"{mtasts.WELL_KNOWN} (mode: testing, then enforce)"
    )
    return Finding(domain, None, "mta-sts", True, problem, fix)


def _check_tls_rpt(domain: str, txt: Answer) -> Finding:
    """RFC 8460 3: a malformed record is a problem; none at all, advice."""
    name = f"_smtp._tls.{domain}"
    wanted = f'{name}. TXT "v=TLSRPTv1; rua=mailto:tls-reports@{domain}"'
    if txt.error or tlsrpt.parse_record(txt.records):
        return Finding(domain, None, "tls-rpt", ok=True)
    if any(r.startswith("v=TLSRPTv1") for r in txt.records):
        problem = f"the TLS-RPT record {name} is not valid, so no sender reports to it"
        return Finding(domain, None, "tls-rpt", False, problem, f"replace it with {wanted}")
    problem = f"{domain} publishes no TLS-RPT record: senders' TLS failures go unreported"
    return Finding(domain, None, "tls-rpt", True, problem, f"publish {wanted}")


def _family(address: IPAddress) -> str:
    return f"ipv{address.version}"


def _label(address: IPAddress) -> str:
    return f"IPv{address.version} {address}"


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
    if any(same_domain(name, ehlo) for name in found.ptr.records):
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
