"""nsmail.core.dkim without key files: signatures an independent verifier (dkimpy) accepts,
mail that is not the tenant's left unsigned, and the DNS record preflight recognises.
(Key files, keygen and the worker's signing: tests/test_dkim.py, as root.)"""

from __future__ import annotations

import re

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from nsmail.core import preflight
from nsmail.core.dkim import DkimError, Signer, dns_record, signer_from_pem
from nsmail.core.message import Message

MESSAGE = b"From: Ann <ann@bcd.test>\r\nTo: bob@cde.test\r\nSubject: hi\r\n\r\nHello  \r\n"


@pytest.fixture(scope="module")
def signer() -> Signer:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return signer_from_pem("bcd.test", "s1", pem)


def _published(signer: Signer) -> str:
    return "".join(re.findall(r'"([^"]*)"', dns_record(signer)))


def test_a_signature_verifies(signer: Signer) -> None:
    signed = b"".join(signer.sign(Message.of(MESSAGE), 1_700_000_000.0).wire())
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(MESSAGE)

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"s1._domainkey.bcd.test."
        return _published(signer).encode()

    assert dkimpy.verify(signed, dnsfunc=lookup)


def test_mail_from_another_domain_is_left_unsigned(signer: Signer) -> None:
    other = Message.of(MESSAGE.replace(b"ann@bcd.test", b"ann@xbcd.test"))
    assert signer.sign(other, 0.0) == other


def test_the_record_is_what_preflight_looks_for(signer: Signer) -> None:
    answer = preflight.Answer((_published(signer),))
    assert preflight.check_dkim("bcd.test", "s1", signer.public_key(), answer).ok


def test_a_key_that_is_no_key_is_refused() -> None:
    with pytest.raises(DkimError, match="not an unencrypted PEM private key"):
        signer_from_pem("bcd.test", "s1", b"-----BEGIN PRIVATE KEY-----\nno\n")
