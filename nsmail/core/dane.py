"""DANE for SMTP (RFC 7672 over RFC 6698 and 7671): which TLSA records are usable, and
whether a server's certificate chain matches them.

Pure: records and DER certificates in, a verdict out; the time is passed in. `usable`
keeps the records an SMTP client may use (RFC 7672 3.1.3: DANE-TA and DANE-EE only),
`check` authenticates a chain against them: a DANE-EE(3) record matches the server's own
certificate or key, with no name or date checks (RFC 7672 3.1.1); a DANE-TA(2) record
matches a certificate of the chain the server sent, which must then issue the server's
certificate, valid now and for one of the reference names (RFC 7672 3.1.2, 3.2.3). The
lookups (DNSSEC-validated answers only) are the worker's (`nsmail.tenant.policies`).

Security: the records come from DNS and the certificates from the server, both hostile;
a record that cannot be used is dropped, a certificate that does not parse matches
nothing, and every failure is a verdict, never an exception.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import crypto

SMTP_PORT = 25


class Usage(IntEnum):
    """RFC 6698 2.1.1 certificate usages."""

    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


# RFC 6698 2.1.3 matching types: 0 the data itself, 1 its SHA-256, 2 its SHA-512 (and the
# length such a digest has: a record of another length can never match, RFC 7671 10.1.2).
_DIGESTS = {0: None, 1: ("sha256", 32), 2: ("sha512", 64)}
_SELECTORS = (0, 1)  # RFC 6698 2.1.2: the whole certificate, or its SubjectPublicKeyInfo


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698 2.1)."""

    usage: int
    selector: int
    matching: int
    data: bytes


def base_name(host: str, port: int = SMTP_PORT) -> str:
    """Where the TLSA records of an MX host are (RFC 7672 2.2.3, RFC 6698 3)."""
    return f"_{port}._tcp.{host.rstrip('.')}"


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records an SMTP client uses: DANE-TA(2) and DANE-EE(3) (RFC 7672 3.1.3: the
    PKIX usages are unusable for SMTP), with a known selector and matching type, and a
    digest of the length its type gives."""
    return tuple(r for r in records if _usable(r))


def _usable(record: Tlsa) -> bool:
    if record.usage not in (Usage.DANE_TA, Usage.DANE_EE) or record.selector not in _SELECTORS:
        return False
    if record.matching not in _DIGESTS:
        return False
    digest = _DIGESTS[record.matching]
    return digest is None or len(record.data) == digest[1]


def check(
    records: Sequence[Tlsa], chain: Sequence[bytes], names: Sequence[str], now: datetime
) -> str | None:
    """None if the chain (DER, the server's certificate first) is authenticated by one of
    the usable `records`; else why not, in words. `names` are the reference identifiers
    a DANE-TA chain must match (the MX host name, then the recipient domain: RFC 7672
    3.2.3)."""
    if not chain:
        return "the server sent no certificate"
    certificates = [_parse(der) for der in chain]
    leaf = certificates[0]
    for record in usable(records):
        if record.usage == Usage.DANE_EE and _matches(record, chain[0], leaf):
            return None
    intermediates = [c for c in certificates[1:] if c is not None]
    for record in usable(records):
        if record.usage != Usage.DANE_TA:
            continue
        for der, anchor in zip(chain[1:], certificates[1:], strict=True):
            matched = anchor is not None and _matches(record, der, anchor)
            if matched and _issued(leaf, anchor, intermediates, names, now):
                return None
    if not usable(records):
        return "no usable TLSA record"
    return "the certificate matches no TLSA record"


def _parse(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _matches(record: Tlsa, der: bytes, certificate: x509.Certificate | None) -> bool:
    if record.selector == 0:
        selected = der
    elif certificate is None:
        return False
    else:
        key = certificate.public_key()
        selected = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = _DIGESTS[record.matching]
    if digest is not None:
        selected = hashlib.new(digest[0], selected).digest()
    return selected == record.data


def _issued(
    leaf: x509.Certificate | None,
    anchor: x509.Certificate | None,
    intermediates: list[x509.Certificate],
    names: Sequence[str],
    now: datetime,
) -> bool:
    """Whether `anchor` issues `leaf` (through `intermediates`), valid at `now` for one of
    `names` (RFC 7672 3.2.3: the TLSA base domain or the next-hop domain).

    The path is OpenSSL's to validate (signatures, dates, CA constraints), through
    pyOpenSSL: Debian 12's python3-cryptography (38) has no path validation of its own.
    The anchor alone is trusted, and need not be self-signed (PARTIAL_CHAIN: a DANE-TA
    record may name an intermediate, RFC 7671 5.2.2)."""
    if leaf is None or anchor is None or not any(_named(leaf, name) for name in names):
        return False
    try:
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(anchor))
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        store.set_time(now)
        chain = [crypto.X509.from_cryptography(c) for c in intermediates]
        served = crypto.X509.from_cryptography(leaf)
        crypto.X509StoreContext(store, served, chain).verify_certificate()
    except (crypto.X509StoreContextError, crypto.Error, ValueError):
        return False
    return True


def _named(certificate: x509.Certificate, name: str) -> bool:
    """Whether the certificate's DNS names hold `name` (RFC 6125 6.4: the subjectAltName
    only; a wildcard only as the whole leftmost label, standing for exactly one label)."""
    wanted = name.rstrip(".").lower()
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        presented = extension.value.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):
        return False
    for pattern in (p.rstrip(".").lower() for p in presented):
        if pattern == wanted:
            return True
        label, dot, rest = wanted.partition(".")
        if pattern.startswith("*.") and dot and label and pattern[2:] == rest:
            return True
    return False
