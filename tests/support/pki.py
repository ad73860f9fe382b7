"""A throwaway certificate authority for the tests: a CA, certificates it issues for the
names a test wants, self-signed impostors, and the TLSA data that names a certificate."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as files (PEM) and as the certificate's DER."""

    cert: Path
    key: Path
    der: bytes

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def tlsa(self) -> str:
        """The TLSA record data "3 1 1 <sha256 of the key>" (DANE-EE, RFC 7671 5.1)."""
        key = x509.load_der_x509_certificate(self.der).public_key()
        spki = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


class Pki:
    """A CA in `directory`; `issue` makes certificates it signs, `impostor` ones it does not."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nsmail test CA")])
        builder = self._builder(self._name, self._key.public_key())
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        self._ca = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._issued = 0  # each certificate's files get a name of their own
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._ca.public_bytes(_PEM))
        self.ca.chmod(0o644)

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca))

    def issue(self, name: str) -> Issued:
        return self._leaf(name, self._name, self._key, f"{name}.")

    def impostor(self, name: str) -> Issued:
        """A certificate for `name` that no CA signed: what a man in the middle shows."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return self._leaf(name, subject, key, f"{name}.impostor.", key)

    def _leaf(
        self,
        name: str,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        stem: str,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        key = key or ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            self._builder(subject, key.public_key(), issuer)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
            .sign(signer, hashes.SHA256())
        )
        self._issued += 1
        stem += f"{self._issued}."
        cert, key_file = self.dir / f"{stem}crt", self.dir / f"{stem}key"
        cert.write_bytes(certificate.public_bytes(_PEM))
        key_file.write_bytes(
            key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        cert.chmod(0o644)
        key_file.chmod(0o644)  # Postfix's smtpd reads it after dropping privileges
        return Issued(cert, key_file, certificate.public_bytes(serialization.Encoding.DER))

    def _builder(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        issuer: x509.Name | None = None,
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        )
