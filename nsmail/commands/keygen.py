"""`nsmail dkim keygen`: a new DKIM signing key for a tenant, and what to publish for it.

The key goes to `<config dir>/dkim/<domain>.<selector>.key`; the command prints its DNS
record and the two configuration lines that make the tenant's worker sign with it. An
existing key is never overwritten: rotating means a new selector.

Security: run by root. The key file is root's, 0600 from its creation, in a directory
outside every tenant home (refused otherwise), made durable and never replaced: a tenant
can neither read it nor put a key of its own in its place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from nsmail.core.dkim import DkimError, PrivateKey, dns_record, signer_from_pem
from nsmail.host.configfile import load

KINDS = ("rsa", "ed25519")
RSA_BITS = 2048
KEY_DIR = "dkim"  # beside the configuration file: /etc/nsmail/dkim


def keygen(config_path: Path, domain: str, selector: str, kind: str) -> str:
    """Make a key for tenant `domain`; the text to show: DNS record and config lines."""
    config = load(config_path)
    tenant = config.tenant(domain)
    if tenant is None:
        raise DkimError(f"{domain!r} is not a tenant in {config_path}")
    if kind not in KINDS:
        raise DkimError(f"{kind!r} is not a key type ({', '.join(KINDS)})")
    key: PrivateKey = (
        ed25519.Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    )
    signer = signer_from_pem(tenant.domain, selector.lower(), _pem(key))
    directory = config_path.parent.resolve() / KEY_DIR
    for other in config.tenants:
        if directory.is_relative_to(other.home.resolve()):
            raise DkimError(f"{directory} is inside the home of {other.domain}")
    path = directory / f"{signer.domain}.{signer.selector}.key"
    _write_new(path, _pem(key))
    return (
        f"Publish this DNS record:\n{dns_record(signer)}\n\n"
        f"Add to the [[tenant]] table of {signer.domain} in {tenant.source}:\n"
        f"dkim_selector = {json.dumps(signer.selector)}\n"  # JSON strings are TOML strings
        f"dkim_key = {json.dumps(str(path))}\n"
    )


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(path: Path, data: bytes) -> None:
    """Write `data` to a new file at `path`, 0600 from the start, durably; never replace."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        raise DkimError(f"{path} exists; choose another selector to rotate keys")
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)  # unlike rename, fails if a key appeared meanwhile
    except FileExistsError:
        raise DkimError(f"{path} exists; choose another selector to rotate keys") from None
    finally:
        temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
