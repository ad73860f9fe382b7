"""`nsmail check --dns` against a real NSD, asking the configured resolvers as the workers'
DNS relay does, while the real supervisor runs the tenants' namespaces (the pure evaluation
of the answers is tests/unit/test_preflight.py's)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hosting import DUAL, THREE, V4_ONLY, V6_ONLY, Hosting, dns_records
from lab import DNS_V4, Lab, Nsd, Record, reverse_name

from nsmail.core.preflight import Finding

SPF = "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8:51::/64 -all"
DMARC = "v=DMARC1; p=reject"
# Only bcd.test signs with DKIM: the others' DMARC rests on SPF, which is advice, not a fault.
ADVICE = "".join(
    f"{domain}: advice: DMARC of {domain} passes on SPF alone, which mail forwarded by a "
    "recipient fails: sign with DKIM: give the tenant dkim_selector and dkim_key (nsmail keygen)\n"
    for domain in ("cde.test", "def.test")
)


# Run in the lab's host namespace, never in the machine's own: a tenant without a namespace
# is checked from where the check runs, and the lab DNS must not be asked over the real
# uplink. argv: config, DKIM public key (DER) of bcd.test's selector s1, text or json.
CHECK = """
import sys
from pathlib import Path
from nsmail.commands import preflight
from nsmail.core.preflight import DkimKey
from nsmail.host.configfile import load
keys = {"bcd.test": [DkimKey("s1", Path(sys.argv[2]).read_bytes())]}
sys.exit(preflight.main(load(Path(sys.argv[1])), [], sys.argv[3] == "json", keys))
"""


@dataclass
class Site:
    lab: Lab
    nsd: Nsd
    hosting: Hosting
    key_file: Path
    dkim_record: Record

    def records(self) -> list[Record]:
        """DNS with which every tenant is all clear."""
        records = [*dns_records(THREE), self.dkim_record]
        for t in THREE:
            records += [(t.domain, "MX", "10 mx.test"), (t.domain, "TXT", SPF)]
            records += [
                (f"_dmarc.{t.domain}", "TXT", DMARC),
                (f"_mta-sts.{t.domain}", "TXT", "v=STSv1; id=1;"),
                (f"_smtp._tls.{t.domain}", "TXT", f"v=TLSRPTv1; rua=mailto:tls@{t.domain}"),
            ]
        return records

    def check(
        self, config: Path | None = None, mode: str = "json"
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", CHECK, str(config or self.hosting.config_path)]
        return self.lab.run(self.lab.host, [*argv, str(self.key_file), mode], check=False)

    def problems(self) -> list[tuple[str, str | None, str, str]]:
        """(tenant, family, check, text line) of every problem; asserts nothing else."""
        result = self.check()
        assert result.stderr == ""
        findings = [Finding(**f) for f in json.loads(result.stdout)]
        assert {f.tenant for f in findings} == {t.domain for t in THREE}
        bad = [(f.tenant, f.family, f.check, f.line()) for f in findings if not f.ok]
        assert result.returncode == (1 if bad else 0)
        return bad


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    der = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with Lab() as lab:
        key_file = lab.tempdir("dkim") / "s1.der"
        key_file.write_bytes(der)
        dkim = (
            "s1._domainkey.bcd.test",
            "TXT",
            f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}",
        )
        # One IPv4 resolver, as everywhere else in the tests: the IPv6-only tenant's worker
        # resolves through the relay, which asks it from the host's namespace.
        hosting = Hosting(lab, resolvers=(DNS_V4,))
        site = Site(lab, Nsd(lab, ()), hosting, key_file, dkim)
        site.nsd.restart(site.records())
        hosting.write_config(THREE)
        hosting.start()
        yield site


def without(records: list[Record], *unwanted: Record) -> list[Record]:
    assert all(r in records for r in unwanted)
    return [r for r in records if r not in unwanted]


def test_a_correct_setup_reports_all_clear(site: Site) -> None:
    site.nsd.restart(site.records())
    assert site.problems() == []
    findings = [Finding(**f) for f in json.loads(site.check().stdout)]
    assert Finding("bcd.test", None, "dkim", True) in findings  # selector s1 was looked up
    text = site.check(mode="text")
    assert (text.returncode, text.stdout, text.stderr) == (0, "all clear\n" + ADVICE, "")


def test_a_domain_without_dmarc_nor_mta_sts(site: Site) -> None:
    unwanted = [(f"_dmarc.{DUAL.domain}", "TXT", DMARC)]
    unwanted.append((f"_mta-sts.{DUAL.domain}", "TXT", "v=STSv1; id=1;"))
    site.nsd.restart(without(site.records(), *unwanted))
    assert site.problems() == [
        (
            "bcd.test",
            None,
            "dmarc",
            "bcd.test: bcd.test has no DMARC record, which Gmail, Yahoo and Microsoft require: "
            'publish _dmarc.bcd.test. TXT "v=DMARC1; p=none; rua=mailto:postmaster@bcd.test"',
        )
    ]
    text = site.check(mode="text").stdout
    assert "bcd.test: advice: bcd.test publishes no MTA-STS policy" in text


def ptr(spec_address: str, name: str) -> Record:
    return (reverse_name(spec_address), "PTR", name)


def test_a_missing_ptr(site: Site) -> None:
    assert V4_ONLY.ipv4 is not None
    site.nsd.restart(without(site.records(), ptr(V4_ONLY.ipv4, V4_ONLY.domain)))
    assert site.problems() == [
        (
            "cde.test",
            "ipv4",
            "ptr",
            f"cde.test: IPv4 {V4_ONLY.ipv4} has no PTR: "
            f"publish {reverse_name(V4_ONLY.ipv4)}. PTR cde.test.",
        )
    ]


def test_a_ptr_naming_another_host(site: Site) -> None:
    assert DUAL.ipv4 is not None
    records = without(site.records(), ptr(DUAL.ipv4, DUAL.domain))
    site.nsd.restart([*records, ptr(DUAL.ipv4, "other.test")])
    rev = reverse_name(DUAL.ipv4)
    assert site.problems() == [
        (
            "bcd.test",
            "ipv4",
            "ptr",
            f"bcd.test: IPv4 {DUAL.ipv4} has PTR other.test, not the EHLO name bcd.test: "
            f"replace {rev}. PTR other.test. with {rev}. PTR bcd.test.",
        )
    ]


def test_an_ehlo_name_without_an_address_record_back(site: Site) -> None:
    assert V4_ONLY.ipv4 is not None
    site.nsd.restart(without(site.records(), (V4_ONLY.domain, "A", V4_ONLY.ipv4)))
    assert site.problems() == [
        (
            "cde.test",
            "ipv4",
            "fcrdns",
            f"cde.test: EHLO name cde.test has no A record, so IPv4 {V4_ONLY.ipv4} has no "
            f"forward-confirmed reverse DNS: publish cde.test. A {V4_ONLY.ipv4}",
        )
    ]


def test_spf_not_covering_the_address(site: Site) -> None:
    narrow = "v=spf1 ip4:198.51.100.0/24 -all"
    records = without(site.records(), (V6_ONLY.domain, "TXT", SPF))
    site.nsd.restart([*records, (V6_ONLY.domain, "TXT", narrow)])
    assert site.problems() == [
        (
            "def.test",
            "ipv6",
            "spf",
            f"def.test: IPv6 {V6_ONLY.ipv6} is not authorised by the SPF record of def.test "
            f'(fail): replace def.test. TXT "{narrow}" with '
            f'"v=spf1 ip6:{V6_ONLY.ipv6} ip4:198.51.100.0/24 -all"',
        )
    ]


def test_ipv6_without_ptr_while_ipv4_is_fine(site: Site) -> None:
    assert DUAL.ipv6 is not None
    site.nsd.restart(without(site.records(), ptr(DUAL.ipv6, DUAL.domain)))
    assert site.problems() == [
        (
            "bcd.test",
            "ipv6",
            "ptr",
            f"bcd.test: IPv6 {DUAL.ipv6} has no PTR: "
            f"publish {reverse_name(DUAL.ipv6)}. PTR bcd.test.",
        )
    ]


def test_an_ipv6_only_tenant_is_checked_as_its_worker_resolves(site: Site) -> None:
    # Its namespace has no IPv4, so it cannot reach the IPv4 resolver; its worker resolves
    # through the DNS relay all the same, and so does the check: every check is made.
    site.nsd.restart(site.records())
    assert site.hosting.status()[V6_ONLY.domain]["state"] != "crashed"
    assert site.hosting.config_path.read_text().count(f'resolvers = ["{DNS_V4}"]') == 1
    result = site.check()
    assert (result.returncode, result.stderr) == (0, "")
    checked = {(f["family"], f["check"], f["ok"]) for f in json.loads(result.stdout)}
    v6_only = {
        (f["family"], f["check"], f["ok"])
        for f in json.loads(result.stdout)
        if f["tenant"] == V6_ONLY.domain
    }
    assert v6_only == {
        ("ipv6", "ptr", True),
        ("ipv6", "fcrdns", True),
        ("ipv6", "spf", True),
        (None, "mx", True),
        (None, "dmarc", True),
        (None, "mta-sts", True),
        (None, "tls-rpt", True),
    }
    assert ("ipv4", "ptr", True) in checked


def test_without_a_supervisor_the_check_is_the_same(site: Site) -> None:
    site.nsd.restart(site.records())
    prefix = site.lab.prefix
    elsewhere = "u" + prefix[1:]  # a prefix with no namespaces: no supervisor runs for it
    assert not list(Path("/run/netns").glob(f"{elsewhere}-*"))
    text = site.hosting.config_path.read_text()
    config = site.hosting.etc / "no-supervisor.toml"
    config.write_text(text.replace(f'prefix = "{prefix}"', f'prefix = "{elsewhere}"'))
    result = site.check(config, mode="text")
    assert (result.returncode, result.stdout, result.stderr) == (0, "all clear\n" + ADVICE, "")
