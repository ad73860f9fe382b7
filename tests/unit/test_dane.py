"""DANE's pure part (RFC 6698, 7671, 7672): usable records, and chains that match or not."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nsmail.core import dane
from nsmail.core.dane import Tlsa

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Issued:
    der: bytes
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def issue(name: str, issuer: Issued | None = None, *, ca: bool = False, days: int = 30) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    if issuer is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
        builder = builder.add_extension(aki, False)
    certificate = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(certificate.public_bytes(Encoding.DER), certificate, key)


def spki(issued: Issued) -> bytes:
    return issued.certificate.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def pki() -> tuple[Issued, Issued]:
    ca = issue("lab CA", ca=True)
    return ca, issue("mx.rcpt.test", ca)


def test_only_dane_ta_and_ee_with_known_types_and_lengths_are_usable() -> None:
    digest = bytes(32)
    records = [
        Tlsa(3, 1, 1, digest),
        Tlsa(2, 0, 1, digest),
        Tlsa(0, 0, 1, digest),  # PKIX-TA: unusable for SMTP (RFC 7672 3.1.3)
        Tlsa(1, 1, 1, digest),  # PKIX-EE
        Tlsa(3, 2, 1, digest),  # no such selector
        Tlsa(3, 1, 3, digest),  # no such matching type
        Tlsa(3, 1, 1, digest[:31]),  # a SHA-256 digest is 32 bytes
        Tlsa(3, 1, 2, digest),  # ... a SHA-512 one 64
    ]
    assert dane.usable(records) == tuple(records[:2])


@pytest.mark.parametrize(("selector", "matching"), [(0, 0), (0, 1), (1, 1), (1, 2), (1, 0)])
def test_dane_ee_matches_the_servers_own_certificate_or_key(
    pki: tuple[Issued, Issued], selector: int, matching: int
) -> None:
    _, leaf = pki
    data = leaf.der if selector == 0 else spki(leaf)
    if matching:
        data = hashlib.new("sha256" if matching == 1 else "sha512", data).digest()
    record = Tlsa(3, selector, matching, data)
    # DANE-EE checks neither names nor dates (RFC 7672 3.1.1).
    assert dane.check([record], [leaf.der], ["elsewhere.test"], NOW) is None
    later = NOW + datetime.timedelta(days=400)
    assert dane.check([record], [leaf.der], [], later) is None


def test_dane_ee_of_another_certificate_fails(pki: tuple[Issued, Issued]) -> None:
    _, leaf = pki
    other = issue("mx.rcpt.test")
    record = Tlsa(3, 1, 1, hashlib.sha256(spki(other)).digest())
    assert dane.check([record], [leaf.der], ["mx.rcpt.test"], NOW) == (
        "the certificate matches no TLSA record"
    )


def test_dane_ta_needs_the_anchor_in_the_chain_to_issue_a_valid_certificate_for_the_name(
    pki: tuple[Issued, Issued],
) -> None:
    ca, leaf = pki
    record = Tlsa(2, 1, 1, hashlib.sha256(spki(ca)).digest())
    names = ["mx.rcpt.test", "rcpt.test"]
    assert dane.check([record], [leaf.der, ca.der], names, NOW) is None
    # The name of neither the MX host nor the recipient domain.
    assert dane.check([record], [leaf.der, ca.der], ["other.test"], NOW) is not None
    # Expired (DANE-TA chains are checked for dates).
    late = NOW + datetime.timedelta(days=60)
    assert dane.check([record], [leaf.der, ca.der], names, late) is not None
    # The anchor's key matches, but it did not issue this certificate.
    impostor = issue("mx.rcpt.test", issue("lab CA", ca=True))
    assert dane.check([record], [impostor.der, ca.der], names, NOW) is not None
    # Without the anchor in the chain there is nothing to match the record against.
    assert dane.check([record], [leaf.der], names, NOW) is not None


def test_dane_ta_may_name_an_intermediate_the_root_is_not_needed() -> None:
    root = issue("lab root", ca=True)
    intermediate = issue("lab intermediate", root, ca=True)
    leaf = issue("mx.rcpt.test", intermediate)
    record = Tlsa(2, 0, 1, hashlib.sha256(intermediate.der).digest())
    assert dane.check([record], [leaf.der, intermediate.der], ["mx.rcpt.test"], NOW) is None
    # The root's record with the root left out of the chain: nothing to match.
    rooted = Tlsa(2, 0, 1, hashlib.sha256(root.der).digest())
    assert dane.check([rooted], [leaf.der, intermediate.der], ["mx.rcpt.test"], NOW) is not None


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("mx.rcpt.test", True),
        ("MX.Rcpt.Test.", True),
        ("a.mx.rcpt.test", False),  # a wildcard stands for one label
        ("rcpt.test", False),
    ],
)
def test_a_wildcard_is_one_leftmost_label(name: str, matches: bool) -> None:
    ca = issue("lab CA", ca=True)
    leaf = issue("*.rcpt.test", ca)
    record = Tlsa(2, 1, 1, hashlib.sha256(spki(ca)).digest())
    assert (dane.check([record], [leaf.der, ca.der], [name], NOW) is None) == matches


def test_nothing_usable_and_nothing_sent_are_failures(pki: tuple[Issued, Issued]) -> None:
    _, leaf = pki
    pkix = Tlsa(1, 0, 0, leaf.der)
    assert dane.check([pkix], [leaf.der], ["mx.rcpt.test"], NOW) == "no usable TLSA record"
    record = Tlsa(3, 0, 0, leaf.der)
    assert dane.check([record], [], ["mx.rcpt.test"], NOW) == "the server sent no certificate"
    assert dane.check([record], [b"not DER"], ["mx.rcpt.test"], NOW) is not None


def test_the_base_name() -> None:
    assert dane.base_name("mx.rcpt.test.") == "_25._tcp.mx.rcpt.test"
