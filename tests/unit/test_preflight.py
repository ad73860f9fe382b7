"""DNS preflight: the pure evaluation of DNS answers and of DKIM key records (`check --dns`
against a real NSD is tests/e2e/test_preflight_dns.py's)."""

from __future__ import annotations

import base64
import dataclasses
import json
from ipaddress import IPv4Address, IPv6Address

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nsmail.commands import preflight
from nsmail.core.preflight import (
    AddressFacts,
    Answer,
    DkimKey,
    Finding,
    SpfVerdict,
    TenantFacts,
    check_dkim,
    evaluate,
    spf_record,
)

V4 = IPv4Address("198.51.100.70")
V6 = IPv6Address("2001:db8:51::70")
SPF = "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8:51::/64 -all"
PTR4 = "70.100.51.198.in-addr.arpa."
PTR6 = "0.7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.5.0.0.8.b.d.0.1.0.0.2.ip6.arpa."


# --- the pure core ---------------------------------------------------------------------


def address(ip: IPv4Address | IPv6Address, ehlo: str = "bcd.test", **changes: object) -> object:
    """The facts of an address whose DNS is all in order, with `changes`."""
    identities = dict.fromkeys(("bcd.test", ehlo))
    good = AddressFacts(
        ip,
        ptr=Answer((ehlo,)),
        forward=Answer((str(ip),)),
        spf=tuple(SpfVerdict(i, "pass", "sender SPF authorized") for i in identities),
    )
    return dataclasses.replace(good, **changes)  # type: ignore[arg-type]


def facts(*addresses: object, ehlo: str = "bcd.test", **changes: object) -> TenantFacts:
    good = TenantFacts(
        "bcd.test",
        ehlo,
        tuple(addresses) or (address(V4, ehlo), address(V6, ehlo)),  # type: ignore[arg-type]
        mx=Answer(("10 mx.test",)),
        spf_records={i: Answer((SPF,)) for i in dict.fromkeys(("bcd.test", ehlo))},
    )
    return dataclasses.replace(good, **changes)  # type: ignore[arg-type]


def problems(tenant_facts: TenantFacts) -> list[str]:
    return [f.line() for f in evaluate(tenant_facts) if not f.ok]


def test_a_correct_setup_is_all_clear() -> None:
    findings = evaluate(facts())
    assert [(f.family, f.check) for f in findings] == [
        ("ipv4", "ptr"),
        ("ipv4", "fcrdns"),
        ("ipv4", "spf"),
        ("ipv6", "ptr"),
        ("ipv6", "fcrdns"),
        ("ipv6", "spf"),
        (None, "mx"),
    ]
    assert all(f.ok and f.problem is None and f.fix is None for f in findings)
    assert preflight.render(findings) == "all clear"
    assert preflight.exit_code(findings) == 0


def test_a_missing_ptr_says_which_record_to_publish() -> None:
    missing = facts(address(V4), address(V6, ptr=Answer()))
    assert problems(missing) == [f"bcd.test: IPv6 {V6} has no PTR: publish {PTR6} PTR bcd.test."]
    assert preflight.exit_code(evaluate(missing)) == 1


def test_a_ptr_naming_another_host_is_replaced() -> None:
    other = facts(address(V4, ptr=Answer(("other.test",))), address(V6))
    assert problems(other) == [
        f"bcd.test: IPv4 {V4} has PTR other.test, not the EHLO name bcd.test: "
        f"replace {PTR4} PTR other.test. with {PTR4} PTR bcd.test."
    ]


def test_a_ptr_set_that_includes_the_ehlo_name_is_fine() -> None:
    assert problems(facts(address(V4, ptr=Answer(("x.test", "BCD.test"))))) == []


def test_an_ehlo_name_not_resolving_back_is_reported() -> None:
    none = facts(address(V4, forward=Answer()), address(V6))
    assert problems(none) == [
        f"bcd.test: EHLO name bcd.test has no A record, so IPv4 {V4} has no forward-confirmed "
        f"reverse DNS: publish bcd.test. A {V4}"
    ]
    elsewhere = facts(address(V4), address(V6, forward=Answer(("2001:db8:51::9",))))
    assert problems(elsewhere) == [
        f"bcd.test: EHLO name bcd.test resolves to 2001:db8:51::9, not to {V6}, so IPv6 {V6} "
        f"has no forward-confirmed reverse DNS: add bcd.test. AAAA {V6}"
    ]


def test_an_ipv6_address_spelled_differently_still_matches() -> None:
    spelled = address(V6, forward=Answer(("2001:0db8:0051:0000:0000:0000:0000:0070",)))
    assert problems(facts(spelled)) == []


def fail(identity: str = "bcd.test", result: str = "fail") -> tuple[SpfVerdict, ...]:
    return (SpfVerdict(identity, result, "SPF fail - not authorized"),)


def test_spf_not_covering_an_address_proposes_the_record_with_it() -> None:
    narrow = "v=spf1 ip4:198.51.100.0/24 -all"
    tenant = facts(
        address(V4), address(V6, spf=fail()), spf_records={"bcd.test": Answer((narrow,))}
    )
    assert problems(tenant) == [
        f"bcd.test: IPv6 {V6} is not authorised by the SPF record of bcd.test (fail): "
        f'replace bcd.test. TXT "{narrow}" with "v=spf1 ip6:{V6} ip4:198.51.100.0/24 -all"'
    ]


def test_both_families_failing_get_the_same_complete_fix() -> None:
    tenant = facts(
        address(V4, spf=fail(result="softfail")),
        address(V6, spf=fail(result="softfail")),
        spf_records={"bcd.test": Answer(("v=spf1 mx ~all",))},
    )
    fixes = {f.fix for f in evaluate(tenant) if not f.ok}
    assert fixes == {
        f'replace bcd.test. TXT "v=spf1 mx ~all" with "v=spf1 ip4:{V4} ip6:{V6} mx ~all"'
    }


def test_no_spf_record_at_all() -> None:
    tenant = facts(
        address(V4, spf=fail(result="none")),
        address(V6, spf=fail(result="none")),
        spf_records={"bcd.test": Answer()},
    )
    assert problems(tenant)[0] == (
        f"bcd.test: IPv4 {V4} is not authorised by SPF: bcd.test has no SPF record: "
        f'publish bcd.test. TXT "v=spf1 ip4:{V4} ip6:{V6} -all"'
    )


def test_an_invalid_or_unevaluable_spf_record() -> None:
    broken = facts(address(V4, spf=(SpfVerdict("bcd.test", "permerror", "Unknown mechanism"),)))
    assert problems(broken) == [
        "bcd.test: the SPF record of bcd.test is invalid (Unknown mechanism), so IPv4 "
        f"{V4} fails: publish exactly one valid SPF record, e.g. "
        f'bcd.test. TXT "v=spf1 ip4:{V4} -all"'
    ]
    timeout = facts(address(V4, spf=(SpfVerdict("bcd.test", "temperror", "DNS timeout"),)))
    (finding,) = [f for f in evaluate(timeout) if not f.ok]
    assert finding.check == "spf"
    assert finding.problem == f"SPF of bcd.test for IPv4 {V4} could not be evaluated (DNS timeout)"
    # A failed TXT lookup beside a "fail" is no proof that the record is missing.
    unknown = facts(address(V4, spf=fail()), spf_records={"bcd.test": Answer(error="SERVFAIL")})
    (finding,) = [f for f in evaluate(unknown) if not f.ok]
    assert finding.problem == f"SPF of bcd.test for IPv4 {V4} could not be evaluated (SERVFAIL)"


def test_a_separate_ehlo_name_gets_its_own_spf_check() -> None:
    helo_fails = (
        SpfVerdict("bcd.test", "pass", ""),
        SpfVerdict("mail.bcd.test", "none", ""),
    )
    tenant = facts(
        address(V4, "mail.bcd.test", spf=helo_fails),
        ehlo="mail.bcd.test",
        spf_records={"bcd.test": Answer((SPF,)), "mail.bcd.test": Answer()},
    )
    assert [(f.check, f.ok) for f in evaluate(tenant)] == [
        ("ptr", True),
        ("fcrdns", True),
        ("spf", True),
        ("spf-helo", False),
        ("mx", True),
    ]
    assert problems(tenant) == [
        f"bcd.test: IPv4 {V4} is not authorised by SPF: the EHLO name mail.bcd.test has no "
        f'SPF record: publish mail.bcd.test. TXT "v=spf1 ip4:{V4} -all"'
    ]


def test_spf_record_puts_new_addresses_first() -> None:
    assert spf_record(None, [V4]) == f"v=spf1 ip4:{V4} -all"
    assert spf_record("v=spf1  -ip4:198.51.100.70 ~all", [V4]) == (
        f"v=spf1 ip4:{V4} -ip4:198.51.100.70 ~all"
    )


def test_a_domain_without_mx_or_with_a_null_mx() -> None:
    assert problems(facts(mx=Answer())) == [
        "bcd.test: the domain has no MX record, so replies and bounces cannot come back: "
        "publish bcd.test. MX 10 <the host that receives mail for bcd.test>."
    ]
    (null,) = problems(facts(mx=Answer(("0 .",))))
    assert "null MX (RFC 7505)" in null
    assert null.endswith(
        "replace bcd.test. MX 0 . with bcd.test. MX 10 <the host that receives mail for bcd.test>."
    )


def test_a_failed_lookup_is_not_mistaken_for_a_missing_record() -> None:
    failed = Answer(error="The DNS operation timed out.")
    tenant = facts(address(V4, ptr=failed), mx=failed)
    assert problems(tenant) == [
        f"bcd.test: the PTR {PTR4} lookup failed (The DNS operation timed out.): make sure the "
        "resolvers reach the zone's nameservers and those answer",
        "bcd.test: the MX bcd.test lookup failed (The DNS operation timed out.): make sure the "
        "resolvers reach the zone's nameservers and those answer",
    ]


def test_the_report_shows_the_problems() -> None:
    bad = Finding("bcd.test", "ipv4", "ptr", False, "IPv4 x has no PTR", "publish y")
    good = Finding("cde.test", None, "mx", True)
    assert preflight.render([good, bad]) == "bcd.test: IPv4 x has no PTR: publish y"
    assert preflight.render([good]) == "all clear"


def test_the_childs_reply_must_be_findings_about_its_own_tenant() -> None:
    good = dataclasses.asdict(Finding("bcd.test", "ipv4", "ptr", False, "x\x1b[2J", None))
    decoded = preflight._decode("bcd.test", json.dumps([good]).encode())
    assert decoded == (Finding("bcd.test", "ipv4", "ptr", False, "x\\x1b[2J", None),)
    for reply in (
        b"",
        b"[]",
        b'{"error": "PermissionError: setns"}',
        json.dumps([{**good, "tenant": "cde.test"}]).encode(),
        json.dumps([{**good, "ok": "yes"}]).encode(),
        json.dumps([{**good, "extra": 1}]).encode(),
    ):
        (broken,) = preflight._decode("bcd.test", reply)
        assert broken.check == "lookup" and not broken.ok
        assert broken.problem is not None and broken.problem.startswith("could not be checked")


# --- DKIM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()


def der(key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_dkim_matches_the_published_rsa_key_in_either_form(rsa_key: rsa.RSAPublicKey) -> None:
    pkcs1 = rsa_key.public_bytes(Encoding.DER, PublicFormat.PKCS1)
    pem = rsa_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    folded = b64(der(rsa_key))
    folded = folded[:100] + " \t" + folded[100:]  # RFC 6376 3.2: FWS inside a value
    for record in (
        f"v=DKIM1; k=rsa; p={b64(der(rsa_key))}",
        f"p={folded}",
        f"v=DKIM1;p={b64(pkcs1)};",  # erratum 3017: an RSAPublicKey
    ):
        for key in (der(rsa_key), pem):
            assert check_dkim("bcd.test", "s1", key, Answer((record,))).ok, record


def test_dkim_ed25519_is_published_bare() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert check_dkim("bcd.test", "s1", der(key), Answer((f"v=DKIM1; k=ed25519; p={b64(raw)}",))).ok
    # Neither the same bytes under the default k=rsa nor an Ed25519 SubjectPublicKeyInfo.
    assert not check_dkim("bcd.test", "s1", der(key), Answer((f"p={b64(raw)}",))).ok
    spki = f"k=ed25519; p={b64(der(key))}"
    assert not check_dkim("bcd.test", "s1", der(key), Answer((spki,))).ok
    missing = check_dkim("bcd.test", "s1", der(key), Answer())
    assert missing.line() == (
        "bcd.test: DKIM selector s1 has no key record: publish s1._domainkey.bcd.test. TXT "
        f'"v=DKIM1; k=ed25519; p={b64(raw)}"'
    )


def test_dkim_problems(rsa_key: rsa.RSAPublicKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    record = f"v=DKIM1; k=rsa; p={b64(der(rsa_key))}"
    cases = {
        f"v=DKIM1; k=rsa; p={b64(der(other))}": "is not the configured signing key",
        "v=DKIM1; k=rsa; p=": "is revoked (empty p=)",
        "v=DKIM2; p=AAAA": "is malformed",
        "k=rsa; k=rsa; p=AAAA": "is malformed",
        "p=not*base64": "is not the configured signing key",
    }
    for published, problem in cases.items():
        finding = check_dkim("bcd.test", "s1", der(rsa_key), Answer((published,)))
        assert not finding.ok and finding.problem is not None
        assert finding.problem.endswith(problem), published
        # A 2048-bit key does not fit one TXT string: the fix splits it (RFC 1035 3.3.14).
        assert finding.fix is not None
        assert finding.fix.startswith(
            f'replace the record with s1._domainkey.bcd.test. TXT "{record[:255]}" "'
        )
    twice = check_dkim("bcd.test", "s1", der(rsa_key), Answer((record, record)))
    assert twice.problem == "DKIM selector s1 has 2 TXT records, verifiers pick any"
    with pytest.raises(ValueError):
        check_dkim("bcd.test", "s1", b"not a key", Answer((record,)))


DMARC = "v=DMARC1; p=none; rua=mailto:postmaster@bcd.test"
WANTED_DMARC = '_dmarc.bcd.test. TXT "v=DMARC1; p=none; rua=mailto:postmaster@bcd.test"'


def receiving(**answers: Answer) -> TenantFacts:
    """Facts of a tenant whose receiving side publishes what `answers` say (else: all)."""
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    key = DkimKey("s1", public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    published = {
        "dmarc": Answer((DMARC,)),
        "mta_sts": Answer(("v=STSv1; id=1;",)),
        "tls_rpt": Answer(("v=TLSRPTv1; rua=mailto:tls@bcd.test",)),
        **answers,
    }
    return dataclasses.replace(facts(), dkim=((key, Answer()),), **published)  # type: ignore[arg-type]


def findings_of(tenant: TenantFacts, *checks: str) -> list[tuple[bool, str]]:
    return [(f.ok, f.line()) for f in evaluate(tenant) if f.check in checks]


def test_dmarc_mta_sts_and_tls_rpt_all_published() -> None:
    assert findings_of(receiving(), "dmarc", "mta-sts", "tls-rpt") == [
        (True, "bcd.test: None"),
        (True, "bcd.test: None"),
        (True, "bcd.test: None"),
    ]


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (
            Answer(),
            f"bcd.test: bcd.test has no DMARC record, which Gmail, Yahoo and Microsoft require: "
            f"publish {WANTED_DMARC}",
        ),
        (
            Answer((DMARC, "v=DMARC1; p=reject")),
            f"bcd.test: bcd.test has 2 DMARC records, so receivers apply none: keep only one, "
            f"e.g. {WANTED_DMARC}",
        ),
        (
            Answer(("v=DMARC1; p=maybe",)),
            f"bcd.test: the DMARC record of bcd.test is malformed (no valid p=): replace it with "
            f"{WANTED_DMARC}",
        ),
    ],
)
def test_dmarc_problems(answer: Answer, line: str) -> None:
    assert findings_of(receiving(dmarc=answer), "dmarc") == [(False, line)]


def test_dmarc_without_dkim_is_advice_to_sign() -> None:
    tenant = dataclasses.replace(receiving(), dkim=())
    ((ok, line),) = findings_of(tenant, "dmarc")
    assert ok and line.startswith("bcd.test: advice: DMARC of bcd.test passes on SPF alone")
    assert preflight.exit_code(evaluate(tenant)) == 0
    assert "advice: DMARC" in preflight.render(evaluate(tenant)).splitlines()[1]


def test_no_mta_sts_nor_tls_rpt_is_advice_a_broken_one_a_problem() -> None:
    absent = receiving(mta_sts=Answer(), tls_rpt=Answer(("v=spf1 -all",)))
    found = findings_of(absent, "mta-sts", "tls-rpt")
    assert [ok for ok, _ in found] == [True, True]
    assert found[0][1] == (
        "bcd.test: advice: bcd.test publishes no MTA-STS policy: senders may deliver to it in "
        'clear: publish _mta-sts.bcd.test. TXT "v=STSv1; id=1;" and '
        "https://mta-sts.bcd.test/.well-known/mta-sts.txt (mode: testing, then enforce)"
    )
    assert found[1][1] == (
        "bcd.test: advice: bcd.test publishes no TLS-RPT record: senders' TLS failures go "
        'unreported: publish _smtp._tls.bcd.test. TXT "v=TLSRPTv1; rua=mailto:tls-reports@bcd.test"'
    )
    broken = receiving(
        mta_sts=Answer(("v=STSv1; id=no-dashes;",)), tls_rpt=Answer(("v=TLSRPTv1;",))
    )
    assert [ok for ok, _ in findings_of(broken, "mta-sts", "tls-rpt")] == [False, False]
    assert preflight.exit_code(evaluate(broken)) == 1
